"""What a search found: every evaluation, the Pareto front, the chosen candidate, and its tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimkit.search.signals import Signals
from slimkit.search.space import Candidate

OBJECTIVE_FIGURE = {"latency": "latency_proxy_ms", "size": "size_bytes", "macs": "macs"}
UNITS = {"latency": "ms (predicted)", "size": "bytes", "macs": "MACs"}


@dataclass
class Evaluation:
    """One evaluated candidate, as its ``candidates.jsonl`` line holds it."""

    index: int  # evaluation order (0: the baseline)
    candidate: Candidate
    phase: str  # baseline, greedy, refine, recover
    metric: float  # the task metric on the validation split
    metrics: dict[str, float]
    figures: dict[str, Any]  # latency_proxy_ms, size_bytes, macs
    objective: float
    meets_floor: bool
    seconds: float
    kept_float: list[str] = field(default_factory=list)  # layers the quant method left float

    @property
    def key(self) -> str:
        return self.candidate.key()

    def to_entry(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "index": self.index,
            "candidate": self.candidate.to_dict(),
            "label": self.candidate.label(),
            "phase": self.phase,
            "metric": self.metric,
            "metrics": self.metrics,
            "figures": self.figures,
            "objective": self.objective,
            "meets_floor": self.meets_floor,
            "seconds": round(self.seconds, 4),
            "kept_float": self.kept_float,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any], index: int, phase: str) -> Evaluation:
        """A logged evaluation replayed at this point of the search (its order and phase are now's)."""
        return cls(
            index,
            Candidate.from_dict(entry["candidate"]),
            phase,
            entry["metric"],
            entry["metrics"],
            entry["figures"],
            entry["objective"],
            entry["meets_floor"],
            entry["seconds"],
            entry.get("kept_float", []),
        )


def better_metric(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def _objective(e: Evaluation) -> float:
    return e.objective


def dominates(a: Evaluation, b: Evaluation, higher_is_better: bool, value: Callable = _objective) -> bool:
    """``a`` is at least as good as ``b`` on both axes (the metric and ``value``, lower is better;
    default: the objective) and better on one."""
    metric_ok = a.metric >= b.metric if higher_is_better else a.metric <= b.metric
    strictly = better_metric(a.metric, b.metric, higher_is_better) or value(a) < value(b)
    return metric_ok and value(a) <= value(b) and strictly


def pareto_front(
    evaluations: list[Evaluation], higher_is_better: bool, value: Callable = _objective
) -> list[Evaluation]:
    """The evaluations no other dominates, by ``value`` (default: the objective; best first);
    equal points kept once."""
    front, seen = [], set()
    for e in sorted(evaluations, key=lambda e: (value(e), e.key)):
        point = (e.metric, value(e))
        if point in seen or any(dominates(o, e, higher_is_better, value) for o in evaluations):
            continue
        seen.add(point)
        front.append(e)
    return front


@dataclass
class SearchResult:
    """``chosen`` is the best candidate within the floor (``met_floor``), or, when none is, the
    closest miss (best effort, labelled so). ``model`` is its model, built again from its
    description; ``test_metrics`` its figures on the test split, which the search never used."""

    metric_name: str
    higher_is_better: bool
    objective: str
    floor: float
    floor_text: str
    baseline: Evaluation
    evaluations: list[Evaluation]
    chosen: Evaluation
    met_floor: bool
    model: nn.Module
    steps: list[tuple[str, Any]]
    signals: Signals
    test_metrics: dict[str, float] = field(default_factory=dict)
    baseline_test_metrics: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)  # end-to-end latency of chosen vs baseline
    resumed: int = 0  # evaluations read back from an earlier run's log
    seconds: float = 0.0

    @property
    def front(self) -> list[Evaluation]:
        return pareto_front(self.evaluations, self.higher_is_better)

    def shortfall(self, e: Evaluation) -> float:
        """How far ``e``'s validation metric is on the wrong side of the floor (0: within it)."""
        gap = self.floor - e.metric if self.higher_is_better else e.metric - self.floor
        return max(gap, 0.0)

    def closest(self, n: int = 5) -> list[tuple[Evaluation, float]]:
        """The candidates nearest the floor, with how far each missed it."""
        tried = [e for e in self.evaluations if not e.candidate.is_baseline]
        ranked = sorted(tried, key=lambda e: (self.shortfall(e), e.objective, e.key))
        return [(e, self.shortfall(e)) for e in ranked[:n]]

    def test_figure(self) -> float | None:
        return self.test_metrics.get(self.metric_name)

    def front_table(self) -> str:
        unit = UNITS[self.objective]
        lines = [
            f"{'#':>4s}  {'val ' + self.metric_name:>14s}  {self.objective + ' ' + unit:>22s}  candidate"
        ]
        for e in self.front:
            mark = " <- chosen" if e.key == self.chosen.key else ""
            mark += "" if e.meets_floor else " (misses the floor)"
            lines.append(f"{e.index:4d}  {e.metric:14.4f}  {e.objective:22.6g}  {e.candidate.label()}{mark}")
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        c, m = self.chosen, self.metric_name
        state = "meets the floor" if self.met_floor else "MISSES the floor (best effort)"
        lines = [
            f"search: {len(self.evaluations) - 1} candidates ({self.resumed} read back from the log) in "
            f"{self.seconds:.1f} s; floor {m} {'>=' if self.higher_is_better else '<='} {self.floor:.4f} "
            f"({self.floor_text}), objective {self.objective}",
            f"chosen: {c.candidate.label()}: {state}; validation {m} {c.metric:.4f} "
            f"(baseline {self.baseline.metric:.4f}), test {m} {self.test_figure()} "
            f"(baseline {self.baseline_test_metrics.get(m)})",
            f"{self.objective}: {c.objective:.6g} vs baseline {self.baseline.objective:.6g} {UNITS[self.objective]}",
        ]
        if self.measured:
            lines.append(
                f"measured end to end: {self.measured['chosen_ms']:.3f} ms vs baseline "
                f"{self.measured['baseline_ms']:.3f} ms ({self.measured['speedup']:.2f}x); latency proxy "
                f"{self.measured['proxy_ms']:.3f} ms (error {100 * self.measured['proxy_error']:+.1f}%)"
            )
        if not self.met_floor:
            lines.append("closest candidates (how far below the floor):")
            lines += [f"  {miss:.4f}  {e.candidate.label()}" for e, miss in self.closest()]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The result as plain data (``search.json``; the chosen model is saved apart)."""
        return {
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "objective": self.objective,
            "floor": self.floor,
            "floor_text": self.floor_text,
            "met_floor": self.met_floor,
            "chosen": self.chosen.to_entry(),
            "test_metrics": self.test_metrics,
            "baseline": self.baseline.to_entry(),
            "baseline_test_metrics": self.baseline_test_metrics,
            "front": [e.to_entry() for e in self.front],
            "closest": [{**e.to_entry(), "missed_by": miss} for e, miss in self.closest()],
            "measured": self.measured,
            "signals": self.signals.to_dict(),
            "evaluations": len(self.evaluations) - 1,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 2),
        }
