"""Quantization-aware training: fake-quantized layers and the callback that swaps them in.

During training each selected Linear/Conv2d computes with weights (and
inputs) rounded to the integer grid and mapped back to float; the rounding is
invisible to autograd thanks to a straight-through estimator (gradient 1
inside the representable range, 0 where values were clipped). After training,
:func:`slimkit.quant.convert_` turns the layers into integer ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.quant.affine import QSpec, fake_quantize, minmax, qparams
from slimkit.quant.config import QATConfig
from slimkit.quant.observers import make_observer
from slimkit.train.callbacks import Callback

ACT_SPEC = QSpec(8, False, "tensor")


class _FakeQuantMixin:
    """Weight and input fake quantization shared by the Linear and Conv2d versions."""

    def _setup(self, config: QATConfig) -> None:
        self.weight_spec = QSpec(config.weight_bits, True, config.weight_granularity, 0)
        self.act_observer = (
            make_observer(config.activation_observer, ACT_SPEC, momentum=config.momentum)
            if config.activation_bits
            else None
        )

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*minmax(self.weight, self.weight_spec), self.weight_spec)

    def _fq_weight(self) -> torch.Tensor:
        scale, zero = self.weight_qparams()
        return fake_quantize(self.weight, scale, zero, self.weight_spec)

    def _fq_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_observer is None:
            return x
        if self.training or self.act_observer.lo is None:
            self.act_observer.update(x)
        scale, zero = self.act_observer.qparams()
        return fake_quantize(x, scale, zero, ACT_SPEC)


class QATLinear(_FakeQuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, config: QATConfig) -> QATLinear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        _share_parameters(mod, linear)
        mod._setup(config)
        mod.train(linear.training)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._fq_input(x), self._fq_weight(), self.bias)


class QATConv2d(_FakeQuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QATConfig) -> QATConv2d:
        mod = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            device="meta",
        )
        _share_parameters(mod, conv)
        mod._setup(config)
        mod.train(conv.training)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._fq_input(x), self._fq_weight(), self.bias)


def _share_parameters(new: nn.Module, old: nn.Module) -> None:
    # The very same Parameter objects: an optimizer built before the swap keeps training them.
    new.weight = old.weight
    new.bias = old.bias


def to_qat(module: nn.Module, config: QATConfig) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return QATConv2d.from_float(module, config)
    return QATLinear.from_float(module, config)


class QATCallback(Callback):
    """Swap fake-quantized layers in when training starts (``prepare_``); optionally convert at the end.

    Build the optimizer after the swap: the Trainer creates it in ``fit`` and the
    swapped layers keep the very same Parameter objects, so an optimizer
    created earlier stays valid either way.
    """

    def __init__(self, config: QATConfig | dict[str, Any], convert_at_end: bool = False):
        from slimkit.quant.config import config_from_dict

        self.config = config_from_dict({"method": "qat", **config}) if isinstance(config, dict) else config
        self.convert_at_end = convert_at_end

    def on_train_begin(self, trainer) -> None:
        from slimkit.quant.api import is_prepared, prepare_

        if not is_prepared(trainer.model):
            prepare_(trainer.model, self.config)

    def on_train_end(self, trainer) -> None:
        if self.convert_at_end:
            from slimkit.quant.api import convert_

            convert_(trainer.model)
