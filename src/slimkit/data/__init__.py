"""slimkit.data: loaders that turn built-in, public and user data into a :class:`DataBundle`.

Building blocks (``TextDataset``, ``split_indices``, ``make_loader``, ``text_collate``)
are imported from ``slimkit.data.base`` and ``slimkit.data.loaders``.
"""

from slimkit.data.base import DataBundle
from slimkit.data.digits import load_digits
from slimkit.data.files import load_hf_dataset, load_image_folder, load_npz, load_table
from slimkit.data.mnist import load_mnist
from slimkit.data.registry import DataConfig, load_data
from slimkit.data.text import load_sentiment, load_sst2, load_stsb, load_trec

__all__ = [
    "DataBundle",
    "DataConfig",
    "load_data",
    "load_digits",
    "load_hf_dataset",
    "load_image_folder",
    "load_mnist",
    "load_npz",
    "load_sentiment",
    "load_sst2",
    "load_stsb",
    "load_table",
    "load_trec",
]
