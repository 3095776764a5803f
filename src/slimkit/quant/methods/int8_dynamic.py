"""int8_dynamic: int8 weights (per output channel), int8 activations with scales computed at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.config import in_range, one_of
from slimkit.quant.base import WEIGHT_OBSERVERS, QuantConfig
from slimkit.quant.builders import int8_layer, smoothed_int8_weight, smoothquant_collectors
from slimkit.quant.codecs import INT8_CODECS
from slimkit.quant.method import QuantMethod, register_method


@dataclass
class Int8DynamicConfig(QuantConfig):
    """int8 weights (per output channel) and int8 activations with scales computed at run time.

    ``activation_granularity``: ``token`` (one scale per row: most accurate) or
    ``tensor`` (one scale per call: what ONNX Runtime's kernels do).
    """

    weight_observer: str = "minmax"
    activation_granularity: str = "token"
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        one_of(self.weight_observer, "weight_observer", WEIGHT_OBSERVERS)
        one_of(self.activation_granularity, "activation_granularity", ("token", "tensor"))
        in_range(self.smoothquant_alpha, "smoothquant_alpha", 0.0, 1.0)

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant


class Int8Dynamic(QuantMethod):
    name = "int8_dynamic"
    config_type = Int8DynamicConfig
    layer_types = (nn.Linear, nn.Conv2d)
    codecs = INT8_CODECS
    takes_folded_conv = True

    def collectors(self, config: Int8DynamicConfig, module: nn.Module) -> dict[str, Any]:
        return smoothquant_collectors(config, module)

    def build(self, config: Int8DynamicConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        q, w_scale, in_scale = smoothed_int8_weight(module, config, collectors)
        return int8_layer(module, q, w_scale, "dynamic", config.activation_granularity, None, in_scale)

    def onnx_problem(self, config: Int8DynamicConfig) -> tuple[str, str] | None:
        if config.activation_granularity != "tensor":
            return (
                "activation_granularity",
                "must be tensor: ONNX Runtime's int8 kernels take one activation scale",
            )
        return None


METHOD = register_method(Int8Dynamic())
