"""The processor slimkit runs on: what it can do, and how busy it is.

- :func:`capability` names the instruction sets the kernels depend on (benchmark tables,
  ``slimkit info``, and :mod:`slimkit.utils.dispatch`, which chooses kernels by them); with
  :data:`EMULATE_AVX2` in the environment a newer CPU behaves as an AVX2-only one.
- :func:`fitted_threads` runs a block with one thread while the machine is
  oversubscribed: more runnable threads (other processes' plus this process's
  PyTorch threads) than cores.

Why one thread under load: slimkit's int8 layers run about eight short parallel
regions per slice of rows (quantize, GEMM, rescale), up to ~170 per layer. Each
region ends at a barrier, and when another process holds a core, the barrier waits
for a descheduled thread for up to a scheduler time slice, far longer than the
region's work: beside 2 busy processes on 2 cores, MiniLM's int8 forward slowed
3.3x while fp32 slowed 2.2x (bench/README.md, "Under load"). One thread has no
barrier, so its time grows only with its share of the CPU, as fp32's does (2.4x).
Results do not change: every kernel involved is exact (int32 GEMM, min/max) or
elementwise, so it computes the same bits with any thread count.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: Set to ``0`` to keep the thread count under load (e.g. when several Python threads run models at once).
ADAPT_ENV = "SLIMKIT_ADAPT_THREADS"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
ATEN_ENV = "ATEN_CPU_CAPABILITY"
_ALLOWED_UNDER = {"avx2": ("avx2",), "default": ()}  # flags whose code PyTorch still runs under each cap
#: Environment that makes an AVX-512 CPU run the code an AVX2-only one runs, library by library
#: (set before Python starts). ONNX Runtime has no such cap: its kernels still use AVX-512 / VNNI.
EMULATE_AVX2 = {
    ATEN_ENV: "avx2",  # ATen's vectorised ops (and slimkit's kernel choice, through capped())
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # float32 GEMMs
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: bf16 and int8 GEMMs, convolutions
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",  # fbgemm int8 GEMMs (with AVX2's int16 saturation)
}


@functools.lru_cache(maxsize=1)
def capability() -> dict[str, object]:
    """PyTorch's CPU capability (``AVX512``, ``AVX2``, ...), which of :data:`FLAGS` the kernels may use
    (the CPU's, less those a cap excludes: see :func:`capped`), the CPU's own, and its model."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:  # not Linux: the flags stay unknown
        lines = []

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), "")

    hardware = [f for f in FLAGS if f in field("flags").split()]
    flags, capped_by = capped(hardware)
    return {
        "torch": torch.backends.cpu.get_cpu_capability(),
        "flags": flags,
        "hardware_flags": hardware,
        "capped_by": capped_by,
        "cores": usable_cores(),
        "model": field("model name") or platform.processor() or "unknown CPU",
    }


def capped(flags: list[str]) -> tuple[list[str], str | None]:
    """The flags left when PyTorch is told to run older code (``ATEN_CPU_CAPABILITY=avx2|default``), and by what.

    Why follow it: the kernels' choice must match the code that runs. Set with the caps in
    :data:`EMULATE_AVX2`, a newer CPU runs every PyTorch library's AVX2 code (fbgemm's int16
    saturation included), so slimkit should choose as on an AVX2-only CPU.
    """
    forced = os.environ.get(ATEN_ENV, "").strip().lower()
    allowed = _ALLOWED_UNDER.get(forced)
    if allowed is None:
        return list(flags), None
    return [f for f in flags if f in allowed], f"{ATEN_ENV}={forced}"


def emulation() -> dict[str, str | None]:
    """Each library cap of :data:`EMULATE_AVX2` as set in this process (None: unset)."""
    return {name: os.environ.get(name) for name in EMULATE_AVX2}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _thread_state(stat: Path) -> str:
    text = stat.read_text()
    return text[text.rindex(")") + 2]  # the field after "(comm)", which may itself hold spaces


def _own_running() -> int:
    own = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            own += _thread_state(stat) == "R"
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we looked
    return own


def others_running() -> float | None:
    """Threads of other processes running or waiting to run now: a snapshot (Linux), else None.

    ``/proc/loadavg``'s fourth field counts the machine's runnable threads; this process's
    own runnable threads (``R`` in ``/proc/self/task/*/stat``), counted just before and just
    after (a thread may wake or sleep in between), are taken out.
    """
    try:
        before = _own_running()
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = max(before, _own_running())
    except (OSError, ValueError, IndexError):
        return None
    return float(max(0, total - own))


def _others_from_loadavg() -> float:
    """Fallback without ``/proc``: the 1-minute load average less this process's threads."""
    try:
        return max(0.0, os.getloadavg()[0] - torch.get_num_threads())
    except (AttributeError, OSError):
        return 0.0


class LoadProbe:
    """Whether other work leaves fewer cores than this process has threads; sampled at most once per ``interval_s``.

    The samples are smoothed (a quarter of the weight to the newest) so that a short spike
    does not flip the decision; a steady load of one or two busy threads is seen within two
    or three samples, and its end within about five.
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        sample: Callable[[], float | None] = others_running,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s, self._sample, self._clock = interval_s, sample, clock
        self._next = -math.inf
        self.others = 0.0  # smoothed count of other runnable threads
        self.single_calls = 0  # blocks run with one thread (for benchmarks and tests)

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.interval_s
        value = self._sample()
        value = _others_from_loadavg() if value is None else value
        self.others += 0.25 * (value - self.others)

    def oversubscribed(self, threads: int) -> bool:
        """More runnable threads than cores (half a thread of slack) if this process ran ``threads``."""
        self._refresh()
        return self.others + threads > usable_cores() + 0.5


PROBE = LoadProbe()


def _adapting() -> bool:
    return os.environ.get(ADAPT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def fitted_threads(probe: LoadProbe | None = None) -> Iterator[int]:
    """Run the block with one PyTorch thread while the machine is oversubscribed; yields the count used.

    Costs a clock read when the machine is quiet; under load, two ``torch.set_num_threads``
    calls per block (so wrap a whole layer, not each small op). The caller's thread count
    is restored on exit.
    """
    probe = PROBE if probe is None else probe
    threads = torch.get_num_threads()
    if threads == 1 or not _adapting() or not probe.oversubscribed(threads):
        yield threads
        return
    probe.single_calls += 1
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)
