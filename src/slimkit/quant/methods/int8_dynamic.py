"""int8_dynamic: int8 weights (per output channel), int8 activations with scales computed at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.calibration.blocks import by_block_when
from slimkit.config import in_range, one_of, positive_int, require
from slimkit.quant.base import WEIGHT_OBSERVERS, BlockCalibration
from slimkit.quant.builders import int8_layer, smoothed_int8_weight, smoothquant_collectors
from slimkit.quant.codecs import INT8_CODECS
from slimkit.quant.method import QuantMethod, register_method


@dataclass
class Int8DynamicConfig(BlockCalibration):
    """int8 weights (per output channel) and int8 activations with scales computed at run time.

    ``activation_granularity``: ``token`` (one scale per row: most accurate) or
    ``tensor`` (one scale per call: what ONNX Runtime's kernels do).

    ``smoothquant``: divide each Linear's input channels by SmoothQuant's factors
    ``s = max|x|^alpha / max|W|^(1 - alpha)`` (measured on calibration data) and
    multiply the weights by them. ``smoothquant_alpha``: a number in ``[0, 1]``
    for every layer, or ``auto`` (the choice for LLMs): per layer, the ``alpha``
    among ``0, 1/grid, ..., 1`` (or no smoothing at all) whose W8A8 output, the
    runtime's very computation, is closest to the float output on
    ``smoothquant_samples`` calibration input rows (``smoothquant_grid``: grid
    steps). The chosen value is in each layer's description (``QuantSummary.quantized``).
    ``sequential``: calibrate a stack of repeated blocks one block at a time
    (null: on for causal LMs, whose logits are then never made).
    """

    weight_observer: str = "minmax"
    activation_granularity: str = "token"
    smoothquant: bool = False
    smoothquant_alpha: float | str = 0.5
    smoothquant_grid: int = 20
    smoothquant_samples: int = 512

    def __post_init__(self):
        super().__post_init__()
        one_of(self.weight_observer, "weight_observer", WEIGHT_OBSERVERS)
        one_of(self.activation_granularity, "activation_granularity", ("token", "tensor"))
        check_smoothquant_alpha(self.smoothquant_alpha, self.smoothquant)
        positive_int(self.smoothquant_grid, "smoothquant_grid")
        require(self.smoothquant_grid <= 100, "smoothquant_grid", "at most 100 alpha steps")
        positive_int(self.smoothquant_samples, "smoothquant_samples")

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant


def check_smoothquant_alpha(alpha: Any, smoothquant: bool) -> None:
    if isinstance(alpha, str):
        require(alpha == "auto", "smoothquant_alpha", f"must be a number in [0, 1] or 'auto', got {alpha!r}")
        require(smoothquant, "smoothquant_alpha", "'auto' needs smoothquant: true")
    else:
        in_range(alpha, "smoothquant_alpha", 0.0, 1.0)


class Int8Dynamic(QuantMethod):
    name = "int8_dynamic"
    config_type = Int8DynamicConfig
    layer_types = (nn.Linear, nn.Conv2d)
    codecs = INT8_CODECS
    takes_folded_conv = True

    def collectors(self, config: Int8DynamicConfig, module: nn.Module) -> dict[str, Any]:
        return smoothquant_collectors(config, module)

    def build(self, config: Int8DynamicConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        q, w_scale, in_scale, alpha = smoothed_int8_weight(module, config, collectors)
        return int8_layer(module, q, w_scale, "dynamic", config.activation_granularity, None, in_scale, alpha)

    def calibrates_by_block(self, config: Int8DynamicConfig, model: nn.Module) -> bool:
        return config.smoothquant and by_block_when(model, config.sequential)

    def onnx_problem(self, config: Int8DynamicConfig) -> tuple[str, str] | None:
        if config.activation_granularity != "tensor":
            return (
                "activation_granularity",
                "must be tensor: ONNX Runtime's int8 kernels take one activation scale",
            )
        return None


METHOD = register_method(Int8Dynamic())
