"""Peak resident memory (RSS) of a stretch of code, against a baseline taken earlier (Linux).

:func:`slimkit.metrics.peak_memory` measures one call against the RSS just
before it. A long job (calibrating an LLM) is measured against an earlier
baseline instead: the RSS before the model was loaded, so the peak counts the
model itself plus everything the job adds. ``PeakRSS`` samples RSS in a
background thread and also reads the kernel's exact high-water mark (when it
can be reset), so short spikes between samples are not lost; ``phase(name)``
splits the sampled peaks by named phases (which part of the job reached what).

    base = rss_bytes()                      # before loading the model
    model = load(...)
    with PeakRSS(baseline=base) as mem:
        mem.phase("capture"); ...
        mem.phase("blocks"); ...
    mem.peak_bytes, mem.phases              # bytes above ``base``
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from slimkit.metrics.model import _hwm, _reset_hwm, _rss
from slimkit.utils.memory import release_free_memory


def rss_bytes() -> int:
    """The process's resident memory now, in bytes (freed heap returned to the system first)."""
    if not Path("/proc/self/statm").exists():
        raise OSError("rss_bytes needs Linux /proc to read resident memory")
    release_free_memory()
    return _rss()


class PeakRSS:
    """Context manager: the highest RSS while it is open, in bytes above ``baseline``.

    ``baseline``: RSS to subtract (default: RSS on entering). After the block:
    ``peak_bytes`` (above the baseline), ``peak_rss_bytes`` (absolute),
    ``method`` (``"hwm"`` when the kernel's high-water mark was reset on entry
    and read on exit, exact; ``"sampling"`` otherwise, every ``interval``
    seconds) and ``phases``: phase name -> sampled peak above the baseline
    (sampled only, so a phase shorter than ``interval`` may read low).
    """

    def __init__(self, baseline: int | None = None, interval: float = 0.005):
        self.baseline_bytes = baseline
        self.interval = interval
        self.peak_rss_bytes = 0
        self.method = "sampling"
        self.phases: dict[str, int] = {}
        self._phase = "main"
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_rss_bytes - (self.baseline_bytes or 0), 0)

    def phase(self, name: str) -> None:
        """Attribute the samples from now on to ``name`` (the current RSS counts for it at once)."""
        self._phase = name
        self._sample()

    def _sample(self) -> None:
        rss = _rss()
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        above = max(rss - (self.baseline_bytes or 0), 0)
        phase = self._phase
        self.phases[phase] = max(self.phases.get(phase, 0), above)

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        if self.baseline_bytes is None:
            self.baseline_bytes = rss_bytes()
        self.method = "hwm" if _reset_hwm() else "sampling"
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self.method == "hwm":
            self.peak_rss_bytes = max(self.peak_rss_bytes, _hwm())
