"""scikit-learn's embedded 8x8 digits: a tiny image set that needs no files."""

from __future__ import annotations

import torch

from slimkit.data._common import tensor_bundle, three_way
from slimkit.data.base import DataBundle


def load_digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> DataBundle:
    """1797 grey 8x8 digits as float32 ``(N, 1, 8, 8)`` in [0, 1] with int64 labels 0..9."""
    from sklearn.datasets import load_digits as sk_load_digits  # heavy import, only when used

    raw = sk_load_digits()
    # Pixel values are counts 0..16 of the original 32x32 bitmap's 4x4 blocks.
    x = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    parts = three_way(len(y), val_fraction, test_fraction, seed)
    info = {"source": "sklearn.datasets.load_digits", "seed": seed}
    return tensor_bundle("digits", "classification", x, y, parts, 10, [str(i) for i in range(10)], info)
