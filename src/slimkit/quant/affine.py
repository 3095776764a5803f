"""Affine quantization math: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x ~ (q - z) * s``.

A :class:`QSpec` says how a tensor is quantized (bits, symmetric or not, and
the granularity: one scale per tensor, per channel along ``axis``, or per group
of ``group_size`` consecutive values along the last dimension of each channel).
Scales and zero points have a fixed shape per granularity:

- ``tensor``: ``()``
- ``channel``: ``(C,)`` with ``C = x.shape[axis]``
- ``group``: ``(C, K // group_size)`` for a 2-D ``(C, K)`` tensor (higher ranks
  are flattened to ``(C, -1)``, as a conv weight is).

Integers are stored signed (``int8``) whatever the bit width, so that int8 GEMM
kernels can consume them directly; 4-bit values are packed two per byte only
for storage (:func:`pack_int4`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.config import one_of, positive_int, require

GRANULARITIES = ("tensor", "channel", "group")
SUPPORTED_BITS = (4, 8)
_EPS = 1e-12


@dataclass(frozen=True)
class QSpec:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self):
        one_of(self.bits, "bits", SUPPORTED_BITS)
        one_of(self.granularity, "granularity", GRANULARITIES)
        if self.granularity == "group":
            require(self.group_size is not None, "group_size", "is required for granularity 'group'")
            positive_int(self.group_size, "group_size")

    @property
    def qmin(self) -> int:
        # Symmetric ranges drop -2^(b-1) so that +x and -x quantize to opposite values.
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def rows_view(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """``x`` as a 2-D view with one row per quantization parameter (row-major over the param shape)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    moved = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    if spec.granularity == "channel":
        return moved
    if moved.shape[1] % spec.group_size:
        raise ValueError(
            f"group_size {spec.group_size} does not divide the {moved.shape[1]} values of each channel"
        )
    return moved.reshape(-1, spec.group_size)


def param_shape(x_shape: torch.Size | tuple[int, ...], spec: QSpec) -> tuple[int, ...]:
    """Shape of the scale and zero point of a tensor of shape ``x_shape``."""
    if spec.granularity == "tensor":
        return ()
    channels = x_shape[spec.axis]
    if spec.granularity == "channel":
        return (channels,)
    per_channel = 1
    for i, n in enumerate(x_shape):
        per_channel *= n if i != spec.axis % len(x_shape) else 1
    return (channels, per_channel // spec.group_size)


def minmax(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granularity minimum and maximum of ``x`` (shaped as :func:`param_shape`)."""
    rows = rows_view(x.detach().float(), spec)
    lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
    shape = param_shape(x.shape, spec)
    return lo.reshape(shape), hi.reshape(shape)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map ``[lo, hi]`` (widened to hold 0) onto the integer range."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        scale = torch.clamp(scale, min=_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=_EPS)
    zero = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero


def _expand(p: torch.Tensor, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Broadcast a parameter of :func:`param_shape` against ``x``."""
    if spec.granularity == "tensor":
        return p
    axis = spec.axis % x.dim()
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)
    # group: repeat along the flattened per-channel dimension, then restore x's layout.
    moved_shape = list(x.movedim(axis, 0).shape)
    full = p.repeat_interleave(spec.group_size, dim=1).reshape(moved_shape)
    return full.movedim(0, axis)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Integer codes of ``x`` as ``int8`` (any bit width up to 8)."""
    s, z = _expand(scale, x, spec), _expand(zero, x, spec)
    q = torch.round(x.float() / s) + z
    return torch.clamp(q, spec.qmin, spec.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    s, z = _expand(scale, q, spec), _expand(zero, q, spec)
    return (q.float() - z) * s


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize forward; straight-through gradient inside the range, zero outside."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax):
        q = torch.round(x / scale) + zero
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - zero) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Differentiable simulation of :func:`quantize` then :func:`dequantize` (for QAT)."""
    s = _expand(scale, x, spec).to(x.dtype)
    z = _expand(zero, x, spec).to(x.dtype)
    return _FakeQuantSTE.apply(x, s, z, spec.qmin, spec.qmax)


def quantize_tensor(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantization of ``x``: ``(q, scale, zero)``."""
    scale, zero = qparams(*minmax(x, spec), spec)
    return quantize(x, scale, zero, spec), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte along the last dimension (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: signed codes in ``[-8, 7]`` as ``int8``."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both > 7, both - 16, both)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is closer)."""
    ref = reference.detach().float()
    noise = (ref - approx.detach().float()).pow(2).mean()
    return float(10 * torch.log10(ref.pow(2).mean() / noise.clamp(min=1e-30)))
