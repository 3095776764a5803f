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

Then, as in the paper's reference code, each group's range is clipped: the
ratio (1.0 down to 0.55) that minimises that group's share of the output error
on the same sample (``clip``). Rounding error grows with the range, and the
largest weight of a group is rarely worth it; ratio 1.0 is plain min-max, so
this step too cannot do worse on the calibration sample.

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
from torch import nn

from slimkit.calibration.blocks import by_block_when
from slimkit.config import one_of, positive_int, require
from slimkit.quant.affine import QSpec, dequantize, minmax, qparams, quantize, quantize_tensor
from slimkit.quant.base import BlockCalibration
from slimkit.quant.collectors import ActivationSample
from slimkit.quant.method import QuantMethod, register_method
from slimkit.quant.methods.weight_only import METHOD as WEIGHT_ONLY
from slimkit.quant.methods.weight_only import WeightOnlyConfig, weight_only_codec
from slimkit.quant.modules import WeightOnlyLinear
from slimkit.quant.scale_search import search_scales


@dataclass
class AWQConfig(BlockCalibration):
    """int4 weights in groups of ``group_size`` (32, 64, 128) with AWQ's per-input-channel scales.

    ``grid``: number of ``alpha`` values tried in ``[0, 1)``; ``samples``: input
    rows per layer kept for the search (spread evenly over the calibration
    batches); ``clip``: search each group's clipping ratio (``clip_grid`` ratios
    from 1.0 down to 0.55); ``sequential``: block by block on causal LMs (null: on
    for them).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    grid: int = 20
    samples: int = 512
    clip: bool = True
    clip_grid: int = 10

    def __post_init__(self):
        super().__post_init__()
        one_of(self.bits, "bits", (4,))
        one_of(self.group_size, "group_size", (32, 64, 128))
        positive_int(self.grid, "grid")
        positive_int(self.samples, "samples")
        require(self.grid <= 100, "grid", "at most 100 alpha values")
        positive_int(self.clip_grid, "clip_grid")
        require(self.clip_grid <= 50, "clip_grid", "at most 50 clipping ratios")

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
        # Exported too: a Div by the scales before MatMulNBits (see WeightOnlyLinear._export_matmul).
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


def clip_search(weight: torch.Tensor, x: torch.Tensor, spec: QSpec, ratios: int) -> tuple[torch.Tensor, ...]:
    """``(q, scale, zero)`` of ``weight`` with each group's range shrunk by its best ratio.

    The output error splits into one term per group of input channels
    (``x[:, g] @ dW[:, g]^T``); each (row, group) keeps the ratio with the
    smallest squared error over the sample rows ``x`` (as the weight sees it).
    That error is ``dW_g^T (X_g^T X_g) dW_g``: with each group's small Gram
    matrix computed once, a ratio costs a weight-sized product, not a pass
    over the sample.
    """
    out_f, in_f = weight.shape
    gs = spec.group_size
    lo, hi = minmax(weight, spec)
    xg = x.float().reshape(-1, in_f // gs, gs).transpose(0, 1)  # (groups, rows, gs)
    gram = xg.transpose(1, 2) @ xg  # (groups, gs, gs)
    wg = weight.reshape(out_f, in_f // gs, gs)
    best_err = torch.full(lo.shape, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(ratios):
        r = 1.0 - 0.45 * i / max(ratios - 1, 1)
        scale, zero = qparams(lo * r, hi * r, spec)
        dw = wg - dequantize(quantize(weight, scale, zero, spec), scale, zero, spec).reshape(wg.shape)
        err = (torch.einsum("ogk,gkl->ogl", dw, gram) * dw).sum(-1)  # (rows, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * r, best_lo), torch.where(better, hi * r, best_hi)
    scale, zero = qparams(best_lo, best_hi, spec)
    return quantize(weight, scale, zero, spec), scale, zero


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
        x = acts.sample()
        s, _ = awq_search(w, acts.mean_abs(), x, spec, config.grid)
        if config.clip:
            q, scale, zero = clip_search(w * s, x / s, spec, config.clip_grid)
        else:
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
