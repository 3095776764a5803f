"""Quantization-aware training inside the Trainer: a callback that prepares (and optionally converts)."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.quant.api import convert_, is_prepared, prepare_
from slimkit.quant.base import config_from_dict
from slimkit.quant.qat import QATConv2d, QATLinear
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
        self._model: nn.Module | None = None
        self._loaded: dict[str, dict] = {}  # observer states from a checkpoint, applied when training begins

    def on_train_begin(self, trainer) -> None:
        if not is_prepared(trainer.model):
            prepare_(trainer.model, self.config)
        self._model = trainer.model
        observers = _observers(trainer.model)
        for name, state in self._loaded.items():
            layer = trainer.model.get_submodule(name)
            observers[name].load_state_dict(state, device=next(layer.parameters()).device)
        self._loaded = {}

    def state_dict(self) -> dict:
        """The activation observers' ranges: not in the model's state dict, yet they set the grid."""
        found = _observers(self._model) if self._model is not None else {}
        return {"observers": {name: obs.state_dict() for name, obs in found.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state.get("observers", {}))

    def on_train_end(self, trainer) -> None:
        if self.convert_at_end:
            convert_(trainer.model)


def _observers(model: nn.Module) -> dict[str, Any]:
    return {
        name: m.act_observer
        for name, m in model.named_modules()
        if isinstance(m, (QATLinear, QATConv2d)) and m.act_observer is not None
    }
