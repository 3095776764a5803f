"""Latency and throughput, measured so that comparisons are fair.

On a shared, noisy machine the speed of one candidate drifts with the load of
the others. ``compare_latency`` therefore interleaves the candidates round by
round (rotating who goes first) instead of timing each in its own block, and
reports medians, which ignore the occasional stall.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LatencyStats:
    """Timings of one callable, in milliseconds per call (each call handles ``batch_size`` samples)."""

    median_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    batch_size: int = 1
    samples_ms: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    @classmethod
    def from_samples(cls, samples_ms: list[float], batch_size: int = 1) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no latency samples")
        return cls(
            median_ms=float(statistics.median(samples_ms)),
            p95_ms=float(np.percentile(samples_ms, 95)),
            mean_ms=float(statistics.fmean(samples_ms)),
            min_ms=float(min(samples_ms)),
            batch_size=batch_size,
            samples_ms=list(samples_ms),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}


@dataclass
class LatencyComparison:
    """Interleaved timings of several candidates and their speedups over ``baseline``.

    ``speedups[name]`` is baseline median / candidate median (> 1 means faster).
    Indexing (``comparison["int8"]``) gives that candidate's :class:`LatencyStats`.
    """

    stats: dict[str, LatencyStats]
    baseline: str
    speedups: dict[str, float]

    def __getitem__(self, name: str) -> LatencyStats:
        return self.stats[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "speedups": dict(self.speedups),
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
        }


@contextlib.contextmanager
def fixed_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; restore the previous count after (None: unchanged)."""
    if n is None:
        yield
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads: must be a positive integer, got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_counts(warmup: int, repeats: int, number: int, batch_size: int) -> None:
    for name, value, least in (("warmup", warmup, 0), ("repeats", repeats, 1), ("number", number, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: must be an integer >= {least}, got {value!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")


def _time_ms(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) * 1000.0 / number


def measure_latency(
    fn: Callable[[], Any],
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = 2,
    batch_size: int = 1,
    number: int = 1,
) -> LatencyStats:
    """Time ``repeats`` calls of the zero-argument ``fn`` after ``warmup`` untimed ones.

    Runs under ``torch.inference_mode`` with ``threads`` intra-op threads.
    Each sample averages ``number`` back-to-back calls (raise it for
    microsecond-scale functions, where one call is below timer noise).
    """
    return compare_latency({"fn": fn}, warmup, repeats, threads, batch_size=batch_size, number=number)["fn"]


def compare_latency(
    fns: Mapping[str, Callable[[], Any]],
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = 2,
    baseline: str | None = None,
    batch_size: int | Mapping[str, int] = 1,
    number: int = 1,
) -> LatencyComparison:
    """Time several zero-argument callables interleaved, round-robin with a rotating order.

    Round ``r`` runs every candidate once, starting from candidate ``r mod k``,
    so no candidate is always first (cold caches) or last. ``baseline`` (default:
    the first name) is the reference of ``speedups``.
    """
    names = list(fns)
    if not names:
        raise ValueError("compare_latency: no functions to time")
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise ValueError(f"baseline: {baseline!r} is not one of {', '.join(names)}")
    sizes = {n: batch_size[n] if isinstance(batch_size, Mapping) else batch_size for n in names}
    for size in sizes.values():
        _check_counts(warmup, repeats, number, size)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with fixed_threads(threads), torch.inference_mode():
        for round_ in range(warmup + repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = _time_ms(fns[name], number)
                if round_ >= warmup:
                    samples[name].append(elapsed)
    stats = {n: LatencyStats.from_samples(samples[n], sizes[n]) for n in names}
    base = stats[baseline].median_ms
    speedups = {n: base / s.median_ms if s.median_ms > 0 else float("inf") for n, s in stats.items()}
    return LatencyComparison(stats, baseline, speedups)


def training_throughput(
    step_fn: Callable[[], Any], batch_size: int, warmup: int = 2, steps: int = 10, threads: int | None = 2
) -> float:
    """Training samples per second: ``batch_size`` / median time of one ``step_fn()`` call.

    ``step_fn`` runs one full training step (forward, backward, optimizer);
    it runs with gradients enabled, unlike the inference timers.
    """
    _check_counts(warmup, steps, 1, batch_size)
    with fixed_threads(threads):
        for _ in range(warmup):
            step_fn()
        times = [_time_ms(step_fn, 1) for _ in range(steps)]
    median = statistics.median(times)
    return batch_size * 1000.0 / median if median > 0 else float("inf")
