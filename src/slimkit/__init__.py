"""slimkit: make trained PyTorch models smaller, faster and cheaper while keeping their accuracy.

Importing ``slimkit`` loads nothing heavy: the families are imported when used,
``from slimkit.train import Trainer``, ``from slimkit.prune import prune_``, ...
"""

__version__ = "0.1.0"
