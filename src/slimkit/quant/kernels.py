"""Calls into PyTorch's integer kernels (no hand-written GEMMs here).

- ``torch._int_mm``: int8 x int8 -> int32 GEMM; on x86 it runs oneDNN's VNNI
  kernels (measured 3-9x faster than fp32 ``addmm`` on the MiniLM shapes with
  2 threads). Used by the dynamic and static int8 Linear/Conv2d modules.
- ``aten._weight_int8pack_mm``: float activations x int8 per-channel weights.
- ``aten._weight_int4pack_mm_for_cpu``: float activations x packed int4 group-wise
  weights (``w = (q - 8) * scale + zero``), the "tinygemm" CPU kernel.

Activations are quantized here, on the fly, with the same affine math as
:mod:`slimkit.quant.affine`; zero points are folded into an int32 correction
so that only the GEMM itself runs on integers.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def quantize_rows_symmetric(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes with one symmetric scale per row (per token)."""
    scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / 127.0
    q = torch.round(x2 / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def tensor_qparams_u8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One asymmetric 8-bit scale and zero point for the whole tensor, range widened to hold 0.

    Matches ONNX ``DynamicQuantizeLinear`` (what ONNX Runtime's dynamic int8
    kernels do), so a model behaves the same in both runtimes.
    """
    lo = torch.clamp(x2.min(), max=0.0)
    hi = torch.clamp(x2.max(), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=_EPS)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero


def quantize_with(x2: torch.Tensor, scale: torch.Tensor, zero_s8: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(x / s) + z, -128, 127)`` (an unsigned zero point is passed shifted by -128)."""
    return torch.round(x2 * (1.0 / scale)).add_(zero_s8).clamp_(-128, 127).to(torch.int8)


def int8_linear_epilogue(
    acc: torch.Tensor,
    scale: torch.Tensor,
    zero_s8: torch.Tensor | None,
    weight_colsum: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(acc - z * colsum(W)) * scale + bias``, the zero-point term folded into one float vector."""
    out = acc * scale  # int32 * float -> float in one pass
    shift = bias
    if zero_s8 is not None:
        corr = -(zero_s8.float() * weight_colsum.float()) * scale.reshape(-1)
        shift = corr if shift is None else shift + corr
    return out if shift is None else out.add_(shift)


def dynamic_int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_colsum: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: str,
) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if granularity == "token":
        xq, x_scale = quantize_rows_symmetric(x2)
        out = int8_linear_epilogue(torch._int_mm(xq, qweight.t()), x_scale * w_scale, None, w_colsum, bias)
    else:
        x_scale, zero = tensor_qparams_u8(x2)
        zero_s8 = zero - 128
        xq = quantize_with(x2, x_scale, zero_s8)
        out = int8_linear_epilogue(torch._int_mm(xq, qweight.t()), x_scale * w_scale, zero_s8, w_colsum, bias)
    return out.reshape(*shape[:-1], -1).to(x.dtype)


def static_int8_linear(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_colsum: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Float ``x2 @ W.T + b`` computed in int8 with a calibrated (fixed) activation scale and zero point."""
    q = quantize_with(x2, x_scale, x_zero)
    return int8_linear_epilogue(torch._int_mm(q, qweight.t()), x_scale * w_scale, x_zero, w_colsum, bias)


def int8_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float().contiguous()
    out = torch.ops.aten._weight_int8pack_mm(x2, qweight, scale)
    return out.reshape(*shape[:-1], -1).to(x.dtype)


def int4_kernel_weight(q_signed: torch.Tensor) -> torch.Tensor:
    """Kernel layout of signed int4 codes ``[N, K]`` (the kernel wants unsigned ``q + 8``)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q_signed.to(torch.int32) + 8).contiguous(), 1)


def int4_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``[K/g, N, 2]`` table for ``w = (u - 8) * s + zf``; our ``w = (q - z) * s`` with ``u = q + 8`` gives ``zf = -z * s``."""
    zf = -zero.float() * scale
    return torch.stack([scale.float(), zf], dim=-1).transpose(0, 1).contiguous()


def int4_weight_only_linear(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor
) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float().contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_zeros)
    return out.reshape(*shape[:-1], -1).to(x.dtype)
