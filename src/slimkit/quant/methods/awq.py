"""awq: int4 (per group) weights with activation-aware per-input-channel scales, float activations.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (2023). A few input channels carry much larger activations than
the rest; their weights matter most. AWQ multiplies each input channel ``j`` of
the weight by ``s_j = mean|x_j| ** alpha`` before rounding (so those weights
get finer steps) and divides the input by ``s_j`` at run time:
``y = (x / s) @ Q(W * s)^T``. ``alpha`` is searched on a grid over ``[0, 1)``
per layer, minimising the layer's output error on calibration inputs;
``alpha = 0`` is round-to-nearest, so the search never does worse than RTN on
the calibration data.

Here the scales are kept in the layer (an ``input_scale`` buffer: one
multiply per input element, small next to the int4 matmul) rather than folded
into the previous operation, so any Linear can take them whatever precedes it.
Weights run on the same int4 kernel as ``weight_only``
(``aten._weight_int4pack_mm_for_cpu``). On models with a stack of repeated
blocks (causal LMs) calibration goes block by block (``slimkit.quant.sequential``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.config import one_of, positive_int, require
from slimkit.quant.affine import QSpec, dequantize, quantize_tensor
from slimkit.quant.base import BlockCalibration
from slimkit.quant.collectors import ActivationSample
from slimkit.quant.method import QuantMethod, register_method
from slimkit.quant.methods.weight_only import METHOD as WEIGHT_ONLY
from slimkit.quant.methods.weight_only import WeightOnlyConfig, weight_only_codec
from slimkit.quant.modules import WeightOnlyLinear
from slimkit.quant.scale_search import search_scales
from slimkit.quant.sequential import by_block_when


@dataclass
class AWQConfig(BlockCalibration):
    """int4 weights in groups of ``group_size`` (32, 64, 128) with AWQ's per-input-channel scales.

    ``grid``: number of ``alpha`` values tried in ``[0, 1)``; ``samples``: input
    rows per layer kept for the search (spread evenly over the calibration
    batches); ``sequential``: block by block on causal LMs (null: on for them).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    grid: int = 20
    samples: int = 512

    def __post_init__(self):
        super().__post_init__()
        one_of(self.bits, "bits", (4,))
        one_of(self.group_size, "group_size", (32, 64, 128))
        positive_int(self.grid, "grid")
        positive_int(self.samples, "samples")
        require(self.grid <= 100, "grid", "at most 100 alpha values")

    @property
    def needs_calibration(self) -> bool:
        return True


class AWQLinear(WeightOnlyLinear):
    """:class:`WeightOnlyLinear` whose input is divided by ``input_scale`` (AWQ's per-channel scales)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None):
        super().__init__(in_features, out_features, bits, group_size)
        self.register_buffer("input_scale", torch.ones(in_features))

    def weight(self) -> torch.Tensor:
        """The float weight this layer applies to its (unscaled) input: ``Q(W * s) / s``."""
        return super().weight() / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            out = F.linear(x, self.weight())
            return out if self.bias_value is None else out + self.bias_value
        return super().forward(x / self.input_scale.to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", awq scales"


def awq_search(
    weight: torch.Tensor, mean_abs: torch.Tensor, x: torch.Tensor, spec: QSpec, grid: int
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales (and their ``alpha``) that minimise ``||x W^T - x Q(W s)^T / s ...||``."""
    base = mean_abs.clamp(min=1e-8)

    def scales_for(alpha: float) -> torch.Tensor:
        s = base.pow(alpha)
        return (
            s / (s.max() * s.min()).sqrt()
        )  # centred around 1: the same rounding, better-conditioned numbers

    def output_for(s: torch.Tensor) -> torch.Tensor:
        q, scale, zero = quantize_tensor(weight * s, spec)
        return x @ (dequantize(q, scale, zero, spec) / s).t()

    s, alpha, _ = search_scales(x, weight, [i / grid for i in range(grid)], scales_for, output_for)
    return s, alpha


class AWQ(QuantMethod):
    name = "awq"
    config_type = AWQConfig
    codecs = (weight_only_codec(AWQLinear),)

    def supports(self, config: AWQConfig, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Linear):
            return "awq handles Linear layers only"
        return WEIGHT_ONLY.supports(WeightOnlyConfig(bits=4, group_size=config.group_size), module)

    def collectors(self, config: AWQConfig, module: nn.Module) -> dict[str, Any]:
        return {"activations": ActivationSample(module.in_features, config.samples)}

    def build(self, config: AWQConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        w = module.weight.detach().float()
        spec = QSpec(4, config.symmetric, "group", 0, config.group_size)
        acts = collectors["activations"]
        s, _ = awq_search(w, acts.mean_abs(), acts.sample(), spec, config.grid)
        q, scale, zero = quantize_tensor(w * s, spec)
        layer = AWQLinear.from_float(module, q, scale, zero, 4, config.group_size)
        layer.input_scale.copy_(s)
        return layer

    def calibrates_by_block(self, config: AWQConfig, model: nn.Module) -> bool:
        return by_block_when(model, config.sequential)

    def weight_bytes(self, config: AWQConfig, module: nn.Module) -> float:
        n = module.weight.numel()
        return n / 2 + 8.0 * n / config.group_size + 4.0 * module.in_features


METHOD = register_method(AWQ())
