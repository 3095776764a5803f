"""Observers: watch tensors during calibration and choose their quantization range.

All observers reduce to a per-granularity ``(lo, hi)`` range (see
:mod:`slimkit.quant.affine`) and differ in how they pick it:

- ``minmax``: the extreme values seen (every value representable; outliers widen the step);
- ``moving_average``: an exponential moving average of each batch's min and max
  (steadier under a few extreme batches; the usual choice during QAT);
- ``percentile``: the given percentile of |x| per batch, averaged (clips rare outliers);
- ``mse``: the clipping of the min-max range that minimises the mean squared
  quantization error on a sample of the observed values.
"""

from __future__ import annotations

import torch

from slimkit.quant.affine import QSpec, dequantize, minmax, param_shape, qparams, quantize, rows_view
from slimkit.train.distributed import DistEnv, gather_objects

OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
_SAMPLE = 1 << 14  # values kept per batch by sampling observers: enough for a stable estimate


class Observer:
    kind = ""  # its name in OBSERVERS
    # Why its range cannot be merged across processes (None: ``all_reduce_`` merges it exactly).
    cross_process: str | None = None

    def __init__(self, spec: QSpec):
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x.detach().float())
        self._merge(lo, hi)
        self.batches += 1

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return minmax(x, self.spec)

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError(f"{type(self).__name__} has seen no data: run calibration batches first")
        return self.lo, self.hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*self.range(), self.spec)

    def all_reduce_(self, env: DistEnv | None) -> None:
        """Under torchrun: the range of all ranks' batches (the extremes; a rank that saw none adds none)."""
        if env is None:
            return
        seen = [s for s in gather_objects((self.lo, self.hi, self.batches), env) if s[0] is not None]
        self.batches = sum(s[2] for s in seen)
        self.lo, self.hi = None, None
        for lo, hi, _ in seen:
            Observer._merge(self, lo, hi)

    _STATE = ("lo", "hi", "_sum_lo", "_sum_hi")  # what the running observers accumulate

    def state_dict(self) -> dict:
        """What the observer has seen so far (tensors and a count), to resume QAT exactly."""
        seen = {k: getattr(self, k) for k in self._STATE if getattr(self, k, None) is not None}
        return {**seen, "batches": self.batches}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        for key, value in state.items():
            if key != "batches" and key not in self._STATE:
                raise KeyError(f"{type(self).__name__} has no state {key!r}")
            setattr(self, key, value.to(device) if isinstance(value, torch.Tensor) else value)


class MinMaxObserver(Observer):
    kind = "minmax"


class MovingAverageObserver(Observer):
    kind = "moving_average"
    cross_process = "its running average depends on the order in which one process sees the batches"

    def __init__(self, spec: QSpec, momentum: float = 0.01):
        super().__init__(spec)
        self.momentum = momentum

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class PercentileObserver(Observer):
    """Averages the per-batch ``percentile`` of the values (low tail and high tail)."""

    kind = "percentile"

    def __init__(self, spec: QSpec, percentile: float = 99.99):
        super().__init__(spec)
        self.q = percentile / 100.0
        self._sum_lo: torch.Tensor | None = None
        self._sum_hi: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows_view(x, self.spec)
        rows = _subsample(rows)
        lo = torch.quantile(rows, 1.0 - self.q, dim=-1)
        hi = torch.quantile(rows, self.q, dim=-1)
        shape = param_shape(x.shape, self.spec)
        return lo.reshape(shape), hi.reshape(shape)

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        # float64 sums rounded to float32 on use: the range does not depend on the order the
        # batches were added in (one process, or several merged by all_reduce_).
        self._sum_lo = lo.double() if self._sum_lo is None else self._sum_lo + lo.double()
        self._sum_hi = hi.double() if self._sum_hi is None else self._sum_hi + hi.double()
        self._mean(self.batches + 1)

    def _mean(self, n: int) -> None:
        self.lo, self.hi = (self._sum_lo / n).float(), (self._sum_hi / n).float()

    def all_reduce_(self, env: DistEnv | None) -> None:
        """The mean of every rank's per-batch percentiles (sums and batch counts summed)."""
        if env is None:
            return
        seen = [s for s in gather_objects((self._sum_lo, self._sum_hi, self.batches), env) if s[2]]
        self.batches = sum(s[2] for s in seen)
        if seen:
            self._sum_lo = sum(s[0] for s in seen)
            self._sum_hi = sum(s[1] for s in seen)
            self._mean(self.batches)


class MSEObserver(Observer):
    """Min-max range, then the shrink factor in [0.3, 1] with the least quantization MSE on a sample."""

    kind = "mse"
    cross_process = "its clipping search runs on samples of the values that stay in each process"

    def __init__(self, spec: QSpec, steps: int = 24):
        super().__init__(spec)
        self.steps = steps
        self._samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self._samples.append(_subsample(rows_view(x.detach().float(), self.spec)))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        sample = torch.cat(self._samples, dim=-1)  # (params, n) rows of observed values
        flat_lo, flat_hi = lo.reshape(-1), hi.reshape(-1)
        best_err = torch.full_like(flat_lo, float("inf"))
        best = torch.ones_like(flat_lo)
        row_spec = QSpec(self.spec.bits, self.spec.symmetric, "channel", 0)
        for factor in torch.linspace(0.3, 1.0, self.steps):
            s, z = qparams(flat_lo * factor, flat_hi * factor, row_spec)
            err = (dequantize(quantize(sample, s, z, row_spec), s, z, row_spec) - sample).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, factor, best)
        return qparams(lo * best.reshape(lo.shape), hi * best.reshape(hi.shape), self.spec)


def _subsample(rows: torch.Tensor) -> torch.Tensor:
    """At most ``_SAMPLE`` values per row, picked with a fixed stride (deterministic)."""
    n = rows.shape[-1]
    if n <= _SAMPLE:
        return rows
    idx = torch.linspace(0, n - 1, _SAMPLE).long()
    return rows[:, idx]


def make_observer(kind: str, spec: QSpec, percentile: float = 99.99, momentum: float = 0.01) -> Observer:
    if kind == "minmax":
        return MinMaxObserver(spec)
    if kind == "moving_average":
        return MovingAverageObserver(spec, momentum)
    if kind == "percentile":
        return PercentileObserver(spec, percentile)
    if kind == "mse":
        return MSEObserver(spec)
    raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}; got {kind!r}")
