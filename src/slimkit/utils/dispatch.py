"""Which kernel each compute path uses on this processor: the one table that decides.

Read by the quantized layers (:mod:`slimkit.quant.kernels`, :mod:`slimkit.quant.modules`),
by the ONNX Runtime export (:mod:`slimkit.export.onnx`) and by ``slimkit info``. Every
choice comes with the reason, so that a step never picks a path slower than float32
without saying so.

Why by processor (issue 17, measured at 2 threads on MiniLM shapes):

- ``torch._int_mm`` runs oneDNN's int8 GEMM only where the CPU has AVX-512 VNNI (PyTorch
  asks ``cpuinfo_has_x86_avx512vnni``) and oneDNN is enabled; elsewhere it runs a scalar
  reference kernel, 0.05x fp32 (8192x384 @ 384->1536: 1.4 s against 69 ms). PyTorch's own
  fbgemm int8 GEMM (``quantized::linear_*``, what ``quantize_dynamic`` runs) is fast on AVX2
  (2.0x fp32 there); without VNNI its u8 x s8 products pass through int16 with saturation,
  so activations are quantized to 7 bits there (``reduce_range``, as PyTorch does).
- bf16 GEMMs are fast only with AVX-512 BF16 or AMX (else 0.16x fp32 on MiniLM).
- ONNX Runtime's u8 x s8 kernels saturate the same way without VNNI; ORT documents 7-bit
  weights (``reduce_range``) or u8 x u8 as the mitigation: u8 x u8 keeps slimkit's codes exactly.

Overrides (for tests and users): ``SLIMKIT_INT8_KERNEL=onednn|fbgemm|fp32``,
``SLIMKIT_BF16_COMPUTE=bf16|fp32``, ``SLIMKIT_INT4_COMPUTE=bf16|fp32``,
``SLIMKIT_ORT_INT8=u8s8|reduce_range|u8u8``.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from slimkit.errors import ConfigError
from slimkit.utils import cpu

INT8_ENV = "SLIMKIT_INT8_KERNEL"
BF16_ENV = "SLIMKIT_BF16_COMPUTE"
INT4_COMPUTE_ENV = "SLIMKIT_INT4_COMPUTE"
ORT_ENV = "SLIMKIT_ORT_INT8"
INT8_KERNELS = ("onednn", "fbgemm", "fp32")
ORT_MODES = ("u8s8", "reduce_range", "u8u8")


@dataclass(frozen=True)
class KernelChoice:
    """``kernel`` for ``path`` and ``why``; ``reduce_range``: int8 codes limited to 7 bits (no saturation);
    ``slower``: slower than a float32 layer here (only when forced, or where no faster kernel exists)."""

    path: str
    kernel: str
    why: str
    reduce_range: bool = False
    slower: bool = False

    def line(self) -> str:
        return f"{self.path}: {self.kernel} ({self.why})"

    @property
    def on_int_mm(self) -> bool:
        """Whether the layer runs slimkit's own int8 path (``torch._int_mm``, or its exact check form)."""
        return self.kernel in ("onednn", "exact")


def _flags() -> tuple[str, ...]:
    return tuple(cpu.capability()["flags"])


def _env(name: str, choices: tuple[str, ...]) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


@functools.lru_cache(maxsize=1)
def _has_fbgemm() -> bool:
    op = "linear_with_input_q_dq_qweight_dq_output_fp32"  # quantized tensors are deprecated: check the op too
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, op)


_EXACT: contextvars.ContextVar[bool] = contextvars.ContextVar("slimkit_exact_int8", default=False)
EXACT = KernelChoice(
    "int8 dynamic/static Linear",
    "exact",
    "checking: the int8 codes multiplied exactly (float64 GEMM), any CPU",
)


@contextmanager
def exact_int8() -> Iterator[None]:
    """Inside the block, int8 layers compute their codes' exact result, whatever the CPU's fast kernel.

    Why: an exported model carries the layers' 8-bit codes and its runtime multiplies them exactly;
    the fast kernel of a CPU without VNNI computes with 7-bit activations (fbgemm), which is close
    on a task (MiniLM STS-B 86.58 against 86.57) but not to the export's tolerance on the raw
    outputs (relative L2 0.45 against 0.25 to float). An export is checked against this instead.
    Slow (float64 GEMMs): for checks on a few samples.
    """
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def exact_active() -> bool:
    """Whether the caller is inside :func:`exact_int8` (one context-variable read: for hot paths)."""
    return _EXACT.get()


def int8_gemm(per_tensor_dynamic: bool = False) -> KernelChoice:
    """The int8 x int8 GEMM of ``QuantLinear`` / ``QuantConv2d`` (asked on every call: cheap, cached);
    ``per_tensor_dynamic``: for a Linear whose activations are quantized per tensor at run time."""
    if exact_active():
        return EXACT
    forced = _env(INT8_ENV, INT8_KERNELS)
    return _int8_choice(_flags(), forced, torch.backends.mkldnn.enabled, _has_fbgemm(), per_tensor_dynamic)


@functools.lru_cache(maxsize=64)
def _int8_choice(
    flags: tuple[str, ...], forced: str | None, mkldnn: bool, fbgemm: bool, per_tensor_dynamic: bool
) -> KernelChoice:
    path = "int8 dynamic per-tensor Linear" if per_tensor_dynamic else "int8 dynamic/static Linear"
    vnni = "avx512_vnni" in flags
    if per_tensor_dynamic and forced is None and vnni and fbgemm:
        # fbgemm quantizes the activations while packing them for its GEMM; slimkit's oneDNN path makes
        # separate passes (MiniLM 64 x 128, 2 threads: 1.92x fp32 against 1.75x; per token and static,
        # where fbgemm gains nothing or loses (1.61x against 1.72x per token), oneDNN stays).
        why = "AVX-512 VNNI, activations per tensor: fbgemm's dynamic int8 GEMM, 8-bit activations"
        return KernelChoice(path, "fbgemm", why)
    if forced is not None:
        slow = forced == "onednn" and not (vnni and mkldnn)
        why = f"{INT8_ENV}={forced}" + (
            "; torch._int_mm's reference kernel here: ~0.05x fp32" if slow else ""
        )
        return KernelChoice(path, forced, why, reduce_range=forced == "fbgemm" and not vnni, slower=slow)
    if vnni and mkldnn:
        return KernelChoice(path, "onednn", "AVX-512 VNNI: oneDNN int8 GEMM through torch._int_mm")
    lacking = "oneDNN disabled" if vnni else "no AVX-512 VNNI"
    if fbgemm:
        why = f"{lacking}: torch._int_mm would run its reference kernel (~0.05x fp32); fbgemm int8 GEMM"
        if not vnni:
            why += ", activations at 7 bits (int16 saturation without VNNI)"
        return KernelChoice(path, "fbgemm", why, reduce_range=not vnni)
    why = f"{lacking} and no fbgemm: float32 GEMM on the dequantized weights (fp32 speed, int8 size)"
    return KernelChoice(path, "fp32", why)


def int8_conv() -> KernelChoice:
    """``QuantConv2d``: its im2col GEMM is ``torch._int_mm``; without oneDNN's kernel, a float conv."""
    gemm = int8_gemm()
    if gemm.on_int_mm:
        return KernelChoice("int8 Conv2d", gemm.kernel, gemm.why)
    why = "no oneDNN int8 GEMM here: float32 conv on the dequantized weights (fp32 speed, int8 size)"
    return KernelChoice("int8 Conv2d", "fp32", why)


def bf16_compute() -> KernelChoice:
    """``BF16Linear``'s GEMM: bf16 where the CPU has it natively, else float32 on the bf16 weights."""
    forced, flags = _env(BF16_ENV, ("bf16", "fp32")), _flags()
    if forced is not None:
        return KernelChoice("bf16", forced, f"{BF16_ENV}={forced}")
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if native and torch.backends.mkldnn.enabled:
        return KernelChoice("bf16", "bf16", f"{native[0].upper()}: oneDNN bf16 GEMM")
    lacking = "oneDNN disabled" if native else "no AVX-512 BF16 / AMX"
    why = f"{lacking}: bf16 GEMMs run slower than fp32 here (0.16x); float32 copy of the bf16 weights"
    return KernelChoice("bf16", "fp32", why)


def _torch_capability() -> str:
    return str(cpu.capability()["torch"]).upper()


def int4_compute() -> KernelChoice:
    """What ``_weight_int4pack_mm_for_cpu`` computes in: bf16 wherever ATen runs vector code.

    The kernel is ATen's own, so ATen's capability decides, not the bf16 flags: its bf16 path
    widens bf16 to float32 in vector registers, which AVX2 does as well as AVX-512, while its
    float32 path is the slow one everywhere (576->1536 int4 g64, 2 threads, one token / 128 rows:
    AVX-512 BF16 0.04 / 1.4 ms in bf16, 0.79 / 98 ms in float32, against 0.11 / 1.2 ms for a
    float32 Linear; ATen's AVX2 code on the same CPU, interleaved: 0.06 / 3.2 ms in bf16, 0.83 /
    101 ms in float32, float32 Linear 0.14 / 2.1 ms). Without vector code (``DEFAULT``) both are slow.
    """
    path = "int4 weight-only"
    forced = _env(INT4_COMPUTE_ENV, ("bf16", "fp32"))
    if forced is not None:
        return KernelChoice(path, f"_weight_int4pack_mm in {forced}", f"{INT4_COMPUTE_ENV}={forced}")
    capability = _torch_capability()
    if capability == "DEFAULT":
        why = "PyTorch runs no vector code here: both compute types run several times slower than fp32"
        return KernelChoice(path, "_weight_int4pack_mm in fp32", why, slower=True)
    if "avx512_bf16" in _flags():
        return KernelChoice(path, "_weight_int4pack_mm in bf16", "AVX-512 BF16: the kernel's fast path")
    why = (
        f"{capability}: the kernel's vectorised bf16 path (its float32 path is 10-60x slower); "
        "faster than fp32 at one token (2.3x measured), 0.65-0.8x on a prompt's rows"
    )
    return KernelChoice(path, "_weight_int4pack_mm in bf16", why, slower=True)


def int8_weight_only() -> KernelChoice:
    """``_weight_int8pack_mm``: like the int4 kernel, fast with bf16 activations only (same choice;
    ATen's AVX2 code: one token 0.06 ms against fp32's 0.14, 128 rows 2.9 ms against 2.1)."""
    int4 = int4_compute()
    dtype = int4.kernel.rsplit(" ", 1)[-1]
    why = int4.why.replace("10-60x", "10-30x")
    return KernelChoice("int8 weight-only", f"_weight_int8pack_mm in {dtype}", why, slower=int4.slower)


def ort_int8() -> KernelChoice:
    """How the exported int8 weights meet ONNX Runtime's GEMM (u8 activations x s8 weights)."""
    path, forced = "ONNX Runtime int8", _env(ORT_ENV, ORT_MODES)
    if forced is not None:
        return KernelChoice(path, forced, f"{ORT_ENV}={forced}", reduce_range=forced == "reduce_range")
    if "avx512_vnni" in _flags() or "avx_vnni" in _flags():
        return KernelChoice(path, "u8s8", "VNNI: MLAS u8 x s8 GEMM without intermediate saturation")
    # u8u8 rather than reduce_range: the same codes as on a VNNI CPU, so the same accuracy (MiniLM
    # STS-B 86.50 either way; 7-bit weights 86.43), on ORT's u8 x u8 kernel, which cannot saturate.
    why = "no VNNI: MLAS u8 x s8 pairs saturate in int16; the same codes as u8 x u8 (zero point 128)"
    return KernelChoice(path, "u8u8", why)


def kernel_table() -> list[KernelChoice]:
    """Every path's choice on this machine, in ``slimkit info``'s order."""
    choices = [int8_gemm(), int8_gemm(per_tensor_dynamic=True), int8_conv(), int8_weight_only()]
    return choices + [int4_compute(), bf16_compute(), ort_int8()]
