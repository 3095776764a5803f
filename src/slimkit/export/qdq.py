"""Static int8 layers (calibrated activation scale) exported in ONNX's QDQ form for ONNX Runtime.

Why QDQ: ONNX Runtime's graph optimizer turns ``DequantizeLinear -> Conv -> QuantizeLinear``
into its integer kernels (``QLinearConv``, ``QLinearMatMul``; ``MatMulIntegerToFloat`` /
``QGemm`` where the output stays float), so a slimkit ``int8_static`` CNN runs on MLAS's int8
convolutions with slimkit's own codes and scales. A layer exports itself through
:func:`qdq_conv` / :func:`qdq_linear` (slimkit.export knows no technique):

* its input: ``QuantizeLinear`` (the calibrated scale; uint8 codes, zero point + 128, the same
  grid as slimkit's signed one) then ``DequantizeLinear``;
* its weights: the int8 codes as an initializer, ``DequantizeLinear`` per output channel;
* its bias: int32 at scale ``x_scale * w_scale`` (what ONNX Runtime's QDQ selectors require).

The layer's output is float. :func:`quantize_outputs` then gives each such Conv / MatMul the
``QuantizeLinear -> DequantizeLinear`` of the next int8 layer's input, moved up past the ReLU,
MaxPool and reshapes between them (quantization commutes with those: same numbers), so the
optimizer finds whole ``DQ -> Conv -> Q`` units to fuse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from slimkit.export.nbits import untraced


@dataclass(frozen=True, eq=False)
class QDQWeights:
    """One int8 static layer's constants, as numpy (graph constants, not traced values)."""

    x_scale: float
    x_zero: int  # uint8 zero point of the input's codes
    codes: np.ndarray  # int8 weight codes, output channels first
    w_scale: np.ndarray  # float32, one per output channel
    bias: np.ndarray | None  # int32 at scale x_scale * w_scale
    dense: torch.Tensor  # the dequantized float weight the trace computes with
    dense_bias: torch.Tensor | None


def qdq_weights(
    x_scale: torch.Tensor, x_zero_s8: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, bias
) -> QDQWeights:
    """The constants for :func:`qdq_conv` / :func:`qdq_linear` from a layer's buffers (signed input zero)."""
    with untraced(), torch.no_grad():
        xs, ws = float(x_scale), w_scale.float().reshape(-1)
        shape = [-1] + [1] * (codes.dim() - 1)
        dense = codes.float() * ws.reshape(shape)
        qbias = None if bias is None else torch.round(bias.float() / (xs * ws)).to(torch.int32)
        return QDQWeights(
            x_scale=xs,
            x_zero=int(x_zero_s8) + 128,
            codes=codes.to(torch.int8).numpy().copy(),
            w_scale=ws.numpy().copy(),
            bias=None if qbias is None else qbias.numpy(),
            dense=dense.clone(),
            dense_bias=None if qbias is None else qbias.float() * (xs * ws),
        )


def _fake_quantize(x: torch.Tensor, w: QDQWeights) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, w.x_scale, w.x_zero, 0, 255)


def _const(g, a: np.ndarray):
    return g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(a)))


def _qdq_inputs(g, x, w: QDQWeights, weight_axis: int = 0) -> list:
    """``[DQ(Q(x)), DQ(weight)]`` and ``DQ(bias)`` if any, as graph values."""
    xs = _const(g, np.array(w.x_scale, np.float32))
    xz = _const(g, np.array(w.x_zero, np.uint8))
    xq = g.op("DequantizeLinear", g.op("QuantizeLinear", x, xs, xz), xs, xz)
    codes = w.codes if weight_axis == 0 else w.codes.T
    out = [xq, _dequantize(g, codes, w.w_scale, weight_axis)]
    if w.bias is not None:
        out.append(_dequantize(g, w.bias, (w.x_scale * w.w_scale).astype(np.float32), 0))
    return out


def _dequantize(g, codes: np.ndarray, scale: np.ndarray, axis: int):
    zero = np.zeros(scale.shape, codes.dtype)
    return g.op("DequantizeLinear", _const(g, codes), _const(g, scale), _const(g, zero), axis_i=axis)


class _QDQConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w: QDQWeights, stride, padding, dilation):
        return F.conv2d(_fake_quantize(x, w), w.dense, w.dense_bias, stride, padding, dilation)

    @staticmethod
    def symbolic(g, x, w: QDQWeights, stride, padding, dilation):
        kernel = list(w.codes.shape[2:])
        pads = [*padding, *padding]
        out = g.op(
            "Conv", *_qdq_inputs(g, x, w), kernel_shape_i=kernel, strides_i=list(stride),
            pads_i=pads, dilations_i=list(dilation), group_i=1,
        )  # fmt: skip
        out.setType(x.type().with_sizes([None] * 4))
        return out


class _QDQLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w: QDQWeights):
        return F.linear(_fake_quantize(x, w), w.dense, w.dense_bias)

    @staticmethod
    def symbolic(g, x, w: QDQWeights):
        sizes = x.type().varyingSizes()
        rank = len(sizes) if sizes is not None else None
        if rank == 2:  # Gemm takes the bias: the QDQ unit becomes one QGemm
            out = g.op("Gemm", *_qdq_inputs(g, x, w), transB_i=1)
        else:  # MatMul reads [K, N] weights (per-channel axis 1), the bias added after
            xq, wq, *bias = _qdq_inputs(g, x, w, weight_axis=1)
            out = g.op("MatMul", xq, wq)
            if bias:
                out = g.op("Add", out, bias[0])
        if rank is not None:
            out.setType(x.type().with_sizes([None] * rank))
        return out


def qdq_conv(x: torch.Tensor, w: QDQWeights, stride, padding, dilation) -> torch.Tensor:
    """An int8 static Conv2d (groups 1, numeric padding) that exports as a QDQ unit."""
    return _QDQConv.apply(x, w, tuple(stride), tuple(padding), tuple(dilation))


def qdq_linear(x: torch.Tensor, w: QDQWeights) -> torch.Tensor:
    """An int8 static Linear that exports as a QDQ unit."""
    return _QDQLinear.apply(x, w)


# Ops between an int8 layer's output and the next one's QuantizeLinear that quantization commutes
# with (monotone, or moving values without changing them): the Q/DQ pair may move above them.
_COMMUTING = {"Relu", "MaxPool", "Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze"}
_INT8_OPS = {"Conv", "Gemm", "MatMul"}


def quantize_outputs(path: str | os.PathLike) -> int:
    """Give each QDQ Conv/Gemm/MatMul whose output reaches another int8 layer's ``QuantizeLinear``
    (through :data:`_COMMUTING` ops only) that quantizer's Q/DQ pair on its output, after a
    directly following ReLU (ONNX Runtime folds a ReLU into a Q with zero point 0). Returns how
    many outputs were quantized.
    """
    import onnx
    from onnx import helper, numpy_helper

    from slimkit.utils.io import atomic_path

    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"}
    )
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    added: dict[str, list] = {}  # tensor name -> the Q/DQ nodes to insert after its producer
    for node in nodes:
        if node.op_type not in _INT8_OPS or not _reads_dequantized(node, producer):
            continue
        start = node.output[0]
        after = readers.get(start, [])
        if len(after) == 1 and after[0].op_type == "Relu":
            start = after[0].output[0]
        quant = _next_quantizer(start, readers)
        if quant is None or start in added or not all(i in consts for i in quant.input[1:3]):
            continue
        tag = f"{start}_requant"
        params = [f"{tag}_scale", f"{tag}_zero"]
        for name, source in zip(params, quant.input[1:3]):  # copies: the originals may come later
            model.graph.initializer.append(numpy_helper.from_array(consts[source], name))
        q = helper.make_node("QuantizeLinear", [start, *params], [f"{tag}_q"], name=f"{tag}_Q")
        dq = helper.make_node("DequantizeLinear", [f"{tag}_q", *params], [tag], name=f"{tag}_DQ")
        for reader in readers.get(start, []):
            reader.input[:] = [tag if i == start else i for i in reader.input]
        added[start] = [q, dq]
    if not added:
        return 0
    order = []
    for n in nodes:
        order.append(n)
        order.extend(added.get(n.output[0], []) if n.output else [])
    del model.graph.node[:]
    model.graph.node.extend(order)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return len(added)


def _reads_dequantized(node, producer) -> bool:
    src = producer.get(node.input[0])
    return src is not None and src.op_type == "DequantizeLinear"


def _next_quantizer(name: str, readers):
    """The QuantizeLinear reached from ``name`` through single-reader commuting ops, or None."""
    while True:
        after = readers.get(name, [])
        if len(after) != 1:
            return None
        node = after[0]
        if node.op_type == "QuantizeLinear":
            return node
        if node.op_type not in _COMMUTING:
            return None
        name = node.output[0]
