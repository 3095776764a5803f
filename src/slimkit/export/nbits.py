"""Weight-only int4/int8 Linear layers exported as ONNX Runtime's ``com.microsoft::MatMulNBits``.

Why this op: it keeps the weights packed in the ``.onnx`` file (4 or 8 bits plus one scale and
zero point per block of ``block_size`` input features) and runs MLAS's blocked low-bit GEMM,
dequantizing on the fly; a float ``MatMul`` on dequantized weights (the export before this
module) stores 4x-8x the bytes and reads them all at every decode step.

A layer asks for it from its own forward during export (slimkit.export knows no technique):
``matmul_nbits(x, nbits_weight(codes, scale, zero, bits, block))``. The layout ONNX Runtime
1.2x-1.3x documents (contrib op schema, ``MatMulNBits``):

* ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``, codes unsigned, low bits first;
* ``scales``: float ``[N * k_blocks]``;
* ``zero_points``: uint8 ``[N * ceil(k_blocks * bits / 8)]`` (two 4-bit zero points per byte);
* ``dequantized = (code - zero_point) * scale``; ``block_size`` a power of two, at least 16.

slimkit's codes are signed (int4 in ``[-8, 7]``, int8 in ``[-128, 127]``); adding ``2^(bits-1)``
to codes and zero points alike gives the same weights exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

BLOCK_SIZES = (128, 64, 32, 16)  # MatMulNBits: powers of two >= 16


@dataclass(frozen=True, eq=False)
class NBitsWeight:
    """One Linear's weights in MatMulNBits' layout (numpy: graph constants, not traced values)."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    k: int
    n: int
    bits: int
    block_size: int
    dense: torch.Tensor  # the dequantized ``[N, K]`` weight: what the trace computes with


@contextlib.contextmanager
def untraced():
    """Tensors made inside are constants to the TorchScript tracer, not ops on the model's buffers.

    Why: the packed weights are computed from the layer's buffers at export time; traced, they
    would become a subgraph of bit operations for ONNX to constant-fold (and warn about).
    """
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def block_size_for(k: int, group_size: int | None) -> int | None:
    """The MatMulNBits block for a layer quantized in groups of ``group_size`` (None: per channel).

    Per-channel scales (int8 weight-only) repeat in every block of the row, so any block works:
    the largest that divides ``K``. None where no valid block fits (then the layer exports as a
    float MatMul).
    """
    if group_size is not None:
        return group_size if group_size in BLOCK_SIZES else None
    return next((b for b in BLOCK_SIZES if k % b == 0), None)


def nbits_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None
) -> NBitsWeight | None:
    """MatMulNBits' weights for signed ``codes [N, K]`` with per-group (or per-channel) ``scale``/``zero``.

    Returns None when the shape has no MatMulNBits form (``K`` not a multiple of a valid block).
    """
    n, k = codes.shape
    block = block_size_for(k, group_size)
    if block is None or k % block:
        return None
    with untraced(), torch.no_grad():
        blocks = k // block
        offset = 2 ** (bits - 1)
        scale = scale.float().reshape(n, -1)
        zero = zero.to(torch.int32).reshape(n, -1)
        if scale.shape[1] == 1:  # per channel: the same scale and zero point in every block
            scale, zero = scale.expand(n, blocks), zero.expand(n, blocks)
        unsigned = (codes.to(torch.int32) + offset).to(torch.uint8).numpy()
        zeros = (zero + offset).to(torch.uint8).numpy()
        dense = (codes.float().reshape(n, blocks, block) - zero[..., None].float()) * scale[..., None]
        return NBitsWeight(
            packed=_pack(unsigned, bits).reshape(n, blocks, block * bits // 8),
            scales=np.ascontiguousarray(scale.numpy().reshape(-1)),
            zeros=_pack(zeros, bits, pad=True).reshape(-1),
            k=k,
            n=n,
            bits=bits,
            block_size=block,
            dense=dense.reshape(n, k).clone(),
        )


def _pack(values: np.ndarray, bits: int, pad: bool = False) -> np.ndarray:
    """Unsigned ``values`` packed along the last axis, low bits first (8 bits: as they are)."""
    if bits == 8:
        return np.ascontiguousarray(values)
    if pad and values.shape[-1] % 2:  # zero points: an odd block count leaves half a byte unused
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    return np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << 4))


class _MatMulNBits(torch.autograd.Function):
    """``x @ W^T`` exported as one ``com.microsoft::MatMulNBits`` node holding ``W``'s packed codes."""

    @staticmethod
    def forward(ctx, x, weight: NBitsWeight, accuracy_level: int):
        return F.linear(x, weight.dense.to(x.dtype))

    @staticmethod
    def symbolic(g, x, weight: NBitsWeight, accuracy_level: int):
        def const(a: np.ndarray):
            return g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(a)))

        inputs = [x, const(weight.packed), const(weight.scales), const(weight.zeros)]
        out = g.op(
            "com.microsoft::MatMulNBits",
            *inputs,
            K_i=weight.k,
            N_i=weight.n,
            bits_i=weight.bits,
            block_size_i=weight.block_size,
            accuracy_level_i=accuracy_level,
        )
        sizes = x.type().varyingSizes()
        if sizes is not None:  # the output's rank for the exporter (ONNX Runtime infers the rest)
            out.setType(x.type().with_sizes([None] * len(sizes)))
        return out


# MatMulNBits' accuracy_level: 0 computes in float32 (weights dequantized block by block); 4
# quantizes the activations to int8 per block and runs MLAS's VNNI/AVX2 int8 kernel. 4 by default:
# measured at one-token decode shapes (bench/bench_export.py, 2 threads) it was 3-4x faster than 0
# for int4 and over 30x for int8 (MLAS's float path for 8 bits is a slow fallback), and the
# activation rounding it adds (~0.5% relative on the conformance models) is far below the int4/int8
# weights' own error. Exports that must match PyTorch to float rounding set 0.
DEFAULT_ACCURACY_LEVEL = 4


def matmul_nbits(x: torch.Tensor, weight: NBitsWeight, accuracy_level: int | None = None):
    """``x @ W^T`` (no bias) that exports as MatMulNBits (``accuracy_level`` None: the module's
    ``DEFAULT_ACCURACY_LEVEL``, read at call time so a benchmark can set it)."""
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    return _MatMulNBits.apply(x, weight, level)
