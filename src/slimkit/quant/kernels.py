"""Calls into PyTorch's integer kernels (no hand-written GEMMs here).

- ``torch._int_mm``: int8 x int8 -> int32 GEMM; on x86 it runs oneDNN's VNNI
  kernels (measured 3-9x faster than fp32 ``addmm`` on the MiniLM shapes with
  2 threads). Used by the dynamic and static int8 Linear/Conv2d modules.
- ``aten._weight_int8pack_mm``: float activations x int8 per-channel weights.
- ``aten._weight_int4pack_mm_for_cpu``: float activations x packed int4 group-wise
  weights (``w = (q - 8) * scale + zero``), the "tinygemm" CPU kernel.
- ``quantized::linear_*`` (fbgemm, what PyTorch's ``quantize_dynamic`` runs): the int8
  GEMM where ``torch._int_mm`` has no fast kernel (no AVX-512 VNNI); the choice is
  :func:`slimkit.utils.dispatch.int8_gemm`'s.

Activations are quantized here, on the fly, with the same affine math as
:mod:`slimkit.quant.affine`; zero points are folded into an int32 correction
so that only the GEMM itself runs on integers.
"""

from __future__ import annotations

import functools
import warnings

import torch

from slimkit.utils import dispatch

_EPS = 1e-12


def quantize_rows_symmetric(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes with one symmetric scale per row (per token)."""
    scale = x2.abs().amax(dim=1, keepdim=True).clamp_(min=_EPS).div_(127.0)
    q = torch.div(x2, scale).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def tensor_qparams_u8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One asymmetric 8-bit scale and zero point for the whole tensor, range widened to hold 0.

    Matches ONNX ``DynamicQuantizeLinear`` (what ONNX Runtime's dynamic int8
    kernels do), so a model behaves the same in both runtimes.
    """
    lo, hi = torch.aminmax(x2)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=_EPS)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero


def quantize_with(x2: torch.Tensor, inv_scale: torch.Tensor, zero_s8: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(x * (1/s)) + z, -128, 127)`` (an unsigned zero point is passed shifted by -128)."""
    return torch.mul(x2, inv_scale).round_().add_(zero_s8).clamp_(-128, 127).to(torch.int8)


def rows_per_slice(bytes_per_row: int) -> int:
    """Rows per slice so that a slice's buffers (inputs, int32 accumulators) take about 3 MB."""
    return max(64, (3 << 20) // max(1, bytes_per_row))


def _by_row_slices(x2: torch.Tensor, out: torch.Tensor, bytes_per_row: int, step) -> torch.Tensor:
    """Run ``step(x_slice, out_slice)`` over slices of rows of ``x2`` and ``out``; returns ``out``.

    Why slices: every elementwise pass over a whole activation (scale, round, clamp,
    cast, rescale) allocates a fresh buffer of tens of MB, which glibc maps and the
    kernel page-faults in; on MiniLM that made quantizing and rescaling around
    ``_int_mm`` cost 4x the GEMM itself. A slice's temporaries are small, reused
    from the heap and stay in cache (measured: 45-50 ms -> 10 ms per 8192-row
    FFN Linear, bit-identical results).
    """
    rows = rows_per_slice(bytes_per_row)
    for i in range(0, x2.shape[0], rows):
        step(x2[i : i + rows], out[i : i + rows])
    return out


def _float_rows(x2: torch.Tensor, n_out: int, step) -> torch.Tensor:
    """:func:`_by_row_slices` into a new float ``[rows, n_out]`` output."""
    out = torch.empty(x2.shape[0], n_out, dtype=torch.float32, device=x2.device)
    return _by_row_slices(x2, out, 4 * (x2.shape[1] + n_out), step)  # float input + int32 accumulator


def zero_point_shift(scale, zero_s8, weight_colsum, bias):
    """Float vector ``-z * colsum(W) * scale + bias``: the zero-point term folded out of the GEMM."""
    shift = bias
    if zero_s8 is not None:
        corr = -(zero_s8.float() * weight_colsum.float()) * scale.reshape(-1)
        shift = corr if shift is None else shift + corr
    return shift


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32: ``torch._int_mm``, or in float64 under :func:`dispatch.exact_int8`
    (every product and sum of int8 codes up to K = 2^38 is an exact float64 integer)."""
    if dispatch.exact_active():  # asked per row slice: a context-variable read, not the whole dispatch
        return torch.mm(a.double(), b.double()).to(torch.int32)
    return torch._int_mm(a, b)


@torch.no_grad()
def int8_gemm_rescaled(rows: torch.Tensor, qweight_t: torch.Tensor, scale, shift, out: torch.Tensor) -> None:
    """``out = (rows @ W.T) * scale + shift`` for int8 ``rows``, written in place."""
    torch.mul(int_mm(rows, qweight_t), scale, out=out)
    if shift is not None:
        out.add_(shift)


@torch.no_grad()
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
        wt = qweight.t()

        def step(xs, out):
            xq, x_scale = quantize_rows_symmetric(xs)
            int8_gemm_rescaled(xq, wt, x_scale * w_scale, bias, out)

        out = _float_rows(x2, qweight.shape[0], step)
    else:  # one scale for the whole tensor, from all rows first; then as if calibrated
        out = static_int8_linear(x2, qweight, dynamic_tensor_terms(x2, w_scale, w_colsum, bias))
    return out.reshape(*shape[:-1], -1).to(x.dtype)


def static_terms(x_scale, x_zero, w_scale, w_colsum, bias) -> tuple[torch.Tensor, ...]:
    """The constants of a calibrated layer: ``(1/s_x, z_x, s_x * s_w, zero-point shift + bias)``."""
    scale = x_scale * w_scale
    return 1.0 / x_scale, x_zero, scale, zero_point_shift(scale, x_zero, w_colsum, bias)


def dynamic_tensor_terms(x, w_scale, w_colsum, bias) -> tuple[torch.Tensor, ...]:
    """:func:`static_terms` with the activation scale and zero point measured on ``x`` itself."""
    x_scale, zero = tensor_qparams_u8(x)
    return static_terms(x_scale, zero - 128, w_scale, w_colsum, bias)


@torch.no_grad()
def quantize_sliced(x: torch.Tensor, inv_scale: torch.Tensor, zero_s8: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_with` over slices of ``x`` (any shape), into one int8 tensor of the same shape."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.int8, device=x.device)

    def step(xs, o):
        o.copy_(quantize_with(xs, inv_scale, zero_s8))

    return _by_row_slices(flat, out, 4 * flat.shape[1], step).reshape(x.shape)


@torch.no_grad()
def static_int8_linear(
    x2: torch.Tensor, qweight: torch.Tensor, terms: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Float ``x2 @ W.T + b`` computed in int8 with a fixed activation scale and zero point.

    ``terms`` comes from :func:`static_terms` (calibrated layers compute it once, not
    on every call) or :func:`dynamic_tensor_terms`.
    """
    wt = qweight.t()
    inv_scale, x_zero, scale, shift = terms

    def step(xs, out):
        int8_gemm_rescaled(quantize_with(xs, inv_scale, x_zero), wt, scale, shift, out)

    return _float_rows(x2, qweight.shape[0], step)


def int8_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``_weight_int8pack_mm`` in ``scale``'s dtype. Why bf16 (AVX2 or AVX-512): as for int4, the
    kernel's float32 path is slow (576->1536: 0.5 ms for one row, 50 ms for 128 rows, against 0.1 and
    1.5 ms for a float32 Linear), its bf16 path about as fast as float32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(scale.dtype).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(x2, qweight, scale)
    return out.reshape(*shape[:-1], -1).to(x.dtype)


def int4_kernel_weight(q_signed: torch.Tensor) -> torch.Tensor:
    """Kernel layout of signed int4 codes ``[N, K]`` (the kernel wants unsigned ``q + 8``)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q_signed.to(torch.int32) + 8).contiguous(), 1)


INT4_COMPUTE_ENV = dispatch.INT4_COMPUTE_ENV  # bf16 | fp32: override the choice


@functools.lru_cache(maxsize=1)
def int4_compute_dtype() -> torch.dtype:
    """What the int4 kernel computes in (:func:`slimkit.utils.dispatch.int4_compute` decides). Why:
    ``_weight_int4pack_mm_for_cpu`` has a fast path for bfloat16 activations and scales only; with
    float32 it ran 10-70x slower than a float32 Linear on an AVX-512 BF16 CPU (576->1536, one token:
    0.83 ms against 0.05 ms in bf16 and 0.08 ms fp32), and ATen's AVX2 code likewise (bf16 is
    widened in registers). bf16 activations add about 0.4% relative error, far below int4's own.
    Only where PyTorch runs no vector code does float32 stay."""
    return torch.bfloat16 if dispatch.int4_compute().kernel.endswith("bf16") else torch.float32


def int4_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``[K/g, N, 2]`` table for ``w = (u - 8) * s + zf``; our ``w = (q - z) * s`` with ``u = q + 8`` gives ``zf = -z * s``."""
    zf = -zero.float() * scale
    table = torch.stack([scale.float(), zf], dim=-1).transpose(0, 1).contiguous()
    return table.to(int4_compute_dtype())


def int4_weight_only_linear(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor
) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(scales_zeros.dtype).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_zeros)
    return out.reshape(*shape[:-1], -1).to(x.dtype)


# fbgemm: the int8 GEMM where torch._int_mm has no fast kernel (see slimkit.utils.dispatch).


@torch.no_grad()
def fbgemm_pack(qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of int8 per-channel weights ``[out, in]`` (and the bias it adds, if given)."""
    zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():  # quantized tensors are deprecated; this is their only use here
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(qweight, w_scale.double(), zeros, 0)
        torch.backends.quantized.engine = "fbgemm"  # the x86 engine may pick oneDNN, slow without VNNI
        try:
            return torch.ops.quantized.linear_prepack(qw, bias)
        finally:
            torch.backends.quantized.engine = engine


def u8_qparams(x_scale, zero_s8, reduce_range: bool) -> tuple[float, int]:
    """fbgemm's unsigned ``(scale, zero)`` for slimkit's signed ones; 7 bits over the same range if asked."""
    scale, zero = float(x_scale), int(zero_s8) + 128
    if reduce_range:  # 255 steps -> 127 steps over the same interval
        scale, zero = scale * 255.0 / 127.0, round(zero * 127.0 / 255.0)
    return scale, zero


@torch.no_grad()
def fbgemm_int8_linear(x2: torch.Tensor, packed, qparams: tuple[float, int] | None, reduce_range: bool):
    """``x2 @ W.T + b`` on fbgemm: ``qparams`` fixed (calibrated), or ``None`` to measure them per call."""
    if qparams is None:
        return torch.ops.quantized.linear_dynamic(x2.contiguous(), packed, reduce_range)
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return op(x2.contiguous(), qparams[0], qparams[1], packed)


@torch.no_grad()
def fbgemm_token_linear(x2, packed_no_bias, n_out: int, bias, reduce_range: bool) -> torch.Tensor:
    """Per-token scales on fbgemm, whose activations share one scale: each row is divided by its own
    scale first, so that fbgemm's codes (scale 1, zero point mid-range) are exactly
    :func:`quantize_rows_symmetric`'s, then the output rows are multiplied back."""
    levels = 63 if reduce_range else 127
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

    def step(xs, out):
        scale = xs.abs().amax(dim=1, keepdim=True).clamp_(min=_EPS).div_(levels)
        torch.mul(op(torch.div(xs, scale), 1.0, levels + 1, packed_no_bias), scale, out=out)
        if bias is not None:
            out.add_(bias)

    return _float_rows(x2, n_out, step)
