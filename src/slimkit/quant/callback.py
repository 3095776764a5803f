"""Quantization-aware training inside the Trainer: a callback that prepares (and optionally converts)."""

from __future__ import annotations

from typing import Any

from slimkit.quant.api import convert_, is_prepared, prepare_
from slimkit.quant.base import config_from_dict
from slimkit.train.callbacks import Callback


class QATCallback(Callback):
    """Swap fake-quantized layers in when training starts (``prepare_``); optionally convert at the end.

    Build the optimizer after the swap: the Trainer creates it in ``fit`` and the
    swapped layers keep the very same Parameter objects, so an optimizer
    created earlier stays valid either way.
    """

    def __init__(self, config: Any, convert_at_end: bool = False):
        # ``config``: a QATConfig or its fields as a mapping ({"weight_bits": 4}).
        self.config = config_from_dict({"method": "qat", **config}) if isinstance(config, dict) else config
        self.convert_at_end = convert_at_end

    def on_train_begin(self, trainer) -> None:
        if not is_prepared(trainer.model):
            prepare_(trainer.model, self.config)

    def on_train_end(self, trainer) -> None:
        if self.convert_at_end:
            convert_(trainer.model)
