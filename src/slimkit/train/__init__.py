"""The training core: one loop, extended through callbacks."""

from slimkit.train.callbacks import Callback
from slimkit.train.config import TrainConfig
from slimkit.train.cv import CVResult, cross_validate
from slimkit.train.trainer import Trainer, TrainResult

__all__ = [
    "Callback",
    "CVResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "cross_validate",
]
