"""Quantization-aware training: the fake-quantized layers (see ``methods/qat.py`` and ``callback.py``).

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
from slimkit.quant.observers import make_observer

ACT_SPEC = QSpec(8, False, "tensor")


class _FakeQuantMixin:
    """Weight and input fake quantization shared by the Linear and Conv2d versions."""

    def _setup(self, config: Any) -> None:
        # ``config``: a QATConfig (weight_bits, weight_granularity, activation_bits, activation_observer, momentum)
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
    def from_float(cls, linear: nn.Linear, config: Any) -> QATLinear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        _share_parameters(mod, linear)
        mod._setup(config)
        mod.train(linear.training)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._fq_input(x), self._fq_weight(), self.bias)


class QATConv2d(_FakeQuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: Any) -> QATConv2d:
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


def to_qat(module: nn.Module, config: Any) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return QATConv2d.from_float(module, config)
    return QATLinear.from_float(module, config)


def to_float(module: QATLinear | QATConv2d) -> nn.Module:
    """The plain Linear/Conv2d with the very same parameters (undoes :func:`to_qat`)."""
    if isinstance(module, nn.Conv2d):
        new = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            device="meta",
        )
    else:
        new = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
    new.weight, new.bias = module.weight, module.bias
    new.train(module.training)
    return new
