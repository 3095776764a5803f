"""How slimkit's quantized layers write themselves into an ONNX graph (asked from their forward
while ``torch.onnx.export`` traces them; the graph pieces live in :mod:`slimkit.export`).

* dynamic int8 Linear (activations per tensor): ``com.microsoft::DynamicQuantizeMatMul``;
* static int8 Linear / Conv2d: a QDQ unit (:mod:`slimkit.export.qdq`), fused by ONNX Runtime
  into ``QLinearConv`` / ``QGemm`` / ``MatMulIntegerToFloat``;
* weight-only int4 / int8 Linear: ``com.microsoft::MatMulNBits`` (:mod:`slimkit.export.nbits`),
  AWQ's input scales a ``Div`` before it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from slimkit.quant.affine import dequantize


class _DynamicQuantizeMatMul(torch.autograd.Function):
    """Exported as ONNX Runtime's ``com.microsoft::DynamicQuantizeMatMul`` with slimkit's int8 weights."""

    @staticmethod
    def forward(ctx, x, qweight_t, w_scale, w_zero, bias):
        return F.linear(x, (qweight_t.float() * w_scale).t(), bias)

    @staticmethod
    def symbolic(g, x, qweight_t, w_scale, w_zero, bias):
        out = g.op("com.microsoft::DynamicQuantizeMatMul", x, qweight_t, w_scale, w_zero, bias)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter the output's rank (ONNX Runtime infers the rest)
            out.setType(x.type().with_sizes([None] * len(sizes)))
        return out


def _export_static(mod, x: torch.Tensor) -> torch.Tensor:
    """A static int8 layer's ONNX QDQ form (ONNX Runtime fuses it into its int8 kernels)."""
    from slimkit.export.nbits import untraced
    from slimkit.export.qdq import qdq_conv, qdq_linear

    if getattr(mod, "in_scale", None) is not None:  # SmoothQuant's 1/s (Linear layers only)
        x = x * mod.in_scale
    with untraced():
        w = mod.qdq_weights()
    if not hasattr(mod, "kernel_size"):  # a Linear
        return qdq_linear(x, w)
    if isinstance(mod.padding, str):  # nn.Conv2d's "same"/"valid": no numeric pads to write
        raise NotImplementedError(f"int8 Conv2d with padding={mod.padding!r} has no QDQ export")
    return qdq_conv(x, w, mod.stride, mod.padding, mod.dilation)


def export_int8(mod, x: torch.Tensor) -> torch.Tensor:
    """A QuantLinear's or QuantConv2d's ONNX form (export_onnx refuses the others beforehand)."""
    if (why := mod.onnx_problem()) is not None:  # reached only by exporting without export_onnx
        raise NotImplementedError(f"no ONNX Runtime form for an {why}")
    if mod.mode == "static":
        return _export_static(mod, x)
    if mod.in_scale is not None:
        x = x * mod.in_scale
    bias = mod.bias_value if mod.bias_value is not None else torch.zeros(mod.out_features)
    qt = mod.qweight.t().contiguous()
    return _DynamicQuantizeMatMul.apply(
        x, qt, mod.w_scale, torch.zeros_like(mod.w_scale, dtype=torch.int8), bias
    )


def export_weight_only(mod, x: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's MatMulNBits on a WeightOnlyLinear's very codes (no bias: the caller adds it);
    a float MatMul where no MatMulNBits block size fits."""
    from slimkit.export.nbits import matmul_nbits, nbits_weight, untraced

    with untraced():
        packed = nbits_weight(mod.codes(), mod.w_scale, mod.w_zero, mod.bits, mod.group_size)
    if packed is None:
        # The layer's own codes, not AWQLinear.weight(): x arrives already divided by AWQ's scales.
        return F.linear(x, dequantize(mod.codes(), mod.w_scale, mod.w_zero.to(torch.int32), mod.spec))
    return matmul_nbits(x, packed)
