"""bf16: bfloat16 weights and compute for the selected Linear layers (not an integer format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.quant.base import QuantConfig
from slimkit.quant.codecs import Info, LayerCodec
from slimkit.quant.method import QuantMethod, no_runtime_form, register_method
from slimkit.quant.modules import BF16Linear


@dataclass
class BF16Config(QuantConfig):
    """bfloat16 weights and compute for the selected layers (not an integer format)."""


def _rebuild(float_module: nn.Module, info: Info) -> nn.Module:
    return BF16Linear.from_float(float_module)


class BF16(QuantMethod):
    name = "bf16"
    config_type = BF16Config
    codecs = (LayerCodec(BF16Linear, _rebuild),)

    def build(self, config: BF16Config, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        return BF16Linear.from_float(module)

    def onnx_problem(self, config: BF16Config) -> tuple[str, str] | None:
        return no_runtime_form(config)


METHOD = register_method(BF16())
