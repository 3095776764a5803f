"""One row per pipeline step: quality, size, cost and speed against the baseline.

The baseline is the row added with ``baseline=True``, or else the first row.
Derived columns are recomputed from the stored figures whenever they are
read, so a loaded report and a freshly built one always agree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimkit.errors import BadInputError
from slimkit.report import formatting as fmt
from slimkit.report.html import write_html
from slimkit.report.plots import Point, plot_tradeoff
from slimkit.report.sections import Section
from slimkit.utils.io import write_json, write_text

REPORT_VERSION = 1
FIGURES = ("size_bytes", "params", "nonzero", "macs", "latency_ms", "p95_ms")


@dataclass
class Row:
    """The measured figures of one pipeline step (None where not measured)."""

    step: str
    metrics: dict[str, Any] = field(default_factory=dict)
    size_bytes: int | None = None
    params: int | None = None
    nonzero: int | None = None
    macs: int | None = None
    latency_ms: float | None = None
    p95_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return value


def _json_safe(value: Any) -> Any:
    """NaN/inf become null so that report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class Report:
    """Rows of per-step figures with deltas, compression and speedup against the baseline row."""

    def __init__(self, task_metric: str = "accuracy", higher_is_better: bool = True, title: str = ""):
        if not task_metric or not isinstance(task_metric, str):
            raise ValueError(f"task_metric: must be a metric name, got {task_metric!r}")
        self.task_metric = task_metric
        self.higher_is_better = bool(higher_is_better)
        self.title = title
        self.rows: list[Row] = []
        # Extra blocks of report.html (Pareto front, sensitivity...): slimkit.report.sections.
        self.sections: list[Section] = []
        # About the run, not a step: "recipe", "machine" (sysinfo.machine_line), "measure".
        self.meta: dict[str, Any] = {}

    def add_row(
        self,
        step: str,
        metrics: dict[str, Any] | None = None,
        size_bytes: int | None = None,
        params: int | None = None,
        nonzero: int | None = None,
        macs: int | None = None,
        latency_ms: float | None = None,
        p95_ms: float | None = None,
        extra: dict[str, Any] | None = None,
        baseline: bool = False,
    ) -> Row:
        """Append one step's figures; ``baseline=True`` makes it the reference row."""
        if not isinstance(step, str) or not step:
            raise ValueError(f"step: must be a non-empty name, got {step!r}")
        if baseline and any(r.baseline for r in self.rows):
            raise ValueError(f"step {step!r}: the report already has a baseline ({self.baseline.step})")
        row = Row(
            step,
            dict(metrics or {}),
            size_bytes,
            params,
            nonzero,
            macs,
            latency_ms,
            p95_ms,
            dict(extra or {}),
            bool(baseline),
        )
        self.rows.append(row)
        return row

    def add_section(self, section: Section | None = None, **fields: Any) -> Section:
        """Add a :class:`Section` (or build one from ``fields``); one with the ``key`` of an
        earlier section replaces it in place."""
        section = section if section is not None else Section(**fields)
        if not isinstance(section, Section):
            raise TypeError(f"add_section: expected a Section, got {type(section).__name__}")
        same = [i for i, s in enumerate(self.sections) if section.key and s.key == section.key]
        if same:
            self.sections[same[0]] = section
        else:
            self.sections.append(section)
        return section

    @property
    def baseline(self) -> Row | None:
        flagged = [r for r in self.rows if r.baseline]
        return flagged[0] if flagged else (self.rows[0] if self.rows else None)

    def metric(self, row: Row) -> float | None:
        """The row's task metric, or None where it was not measured."""
        return _number(row.metrics.get(self.task_metric))

    def derived(self, row: Row) -> dict[str, float | None]:
        """``delta`` (metric - baseline metric), ``compression`` (baseline size / size),
        ``speedup`` (baseline latency / latency), ``sparsity`` (1 - nonzero / params)."""
        base = self.baseline
        value, base_value = self.metric(row), self.metric(base) if base else None
        return {
            "delta": None if value is None or base_value is None else value - base_value,
            "compression": _ratio(base.size_bytes if base else None, row.size_bytes),
            "speedup": _ratio(base.latency_ms if base else None, row.latency_ms),
            "sparsity": None if _ratio(row.nonzero, row.params) is None else 1 - row.nonzero / row.params,
        }

    def _other_metrics(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row.metrics if k != self.task_metric and k not in names]
        return names

    def _columns(self) -> list[tuple[str, Callable[[Row], str]]]:
        d = self.derived
        columns: list[tuple[str, Callable[[Row], str]]] = [
            ("step", lambda r: r.step + (" *" if r is self.baseline else "")),
            (self.task_metric, lambda r: fmt.format_metric(r.metrics.get(self.task_metric))),
            ("delta", lambda r: fmt.format_delta(d(r)["delta"])),
        ]
        for name in self._other_metrics():
            columns.append((name, lambda r, n=name: fmt.format_metric(r.metrics.get(n))))
        columns += [
            ("size", lambda r: fmt.format_bytes(r.size_bytes)),
            ("compression", lambda r: fmt.format_ratio(d(r)["compression"])),
            ("params", lambda r: fmt.format_count(r.params)),
            ("nonzero", lambda r: fmt.format_count(r.nonzero)),
            ("sparsity", lambda r: fmt.format_percent(d(r)["sparsity"])),
            ("MACs", lambda r: fmt.format_count(r.macs)),
            ("latency", lambda r: fmt.format_ms(r.latency_ms)),
            ("p95", lambda r: fmt.format_ms(r.p95_ms)),
            ("speedup", lambda r: fmt.format_ratio(d(r)["speedup"])),
        ]
        for name in self._generation_columns():  # language models: prefill/decode tokens/s per batch
            columns.append((name, lambda r, n=name: fmt.format_rate(r.extra.get("generation", {}).get(n))))
        return columns

    def _generation_columns(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            generation = row.extra.get("generation")
            if isinstance(generation, dict):
                names += [k for k in generation if k not in names]
        return names

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """The steps table as text: the header and one list of cells per row (every format uses it)."""
        columns = self._columns()
        return [name for name, _ in columns], [[cell(r) for _, cell in columns] for r in self.rows]

    def to_table(self) -> str:
        """Aligned plain text; the baseline step is marked ``*``, missing figures ``-``."""
        header, body = self.cells()
        widths = [max(len(c) for c in col) for col in zip(header, *body)]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [self.title] if self.title else []
        return "\n".join(lines + [line(header), rule] + [line(cells) for cells in body]) + "\n"

    def to_markdown(self) -> str:
        header, body = self.cells()
        lines = [f"# {self.title}", ""] if self.title else []
        lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        arrow = "higher" if self.higher_is_better else "lower"
        lines += ["", f"Task metric: `{self.task_metric}` ({arrow} is better); baseline marked `*`."]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_table()

    def to_json(self) -> dict[str, Any]:
        base = self.baseline
        rows = [
            {
                **{k: getattr(r, k) for k in ("step", "metrics", *FIGURES, "extra")},
                "baseline": r is base,
                "derived": self.derived(r),
            }
            for r in self.rows
        ]
        return _json_safe(
            {
                "version": REPORT_VERSION,
                "title": self.title,
                "task_metric": self.task_metric,
                "higher_is_better": self.higher_is_better,
                "baseline": base.step if base else None,
                "rows": rows,
                "meta": self.meta,
                "sections": [s.to_json() for s in self.sections],
            }
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        report = cls(
            data.get("task_metric", "accuracy"), data.get("higher_is_better", True), data.get("title", "")
        )
        for row in data.get("rows", []):
            figures = {k: row.get(k) for k in FIGURES}
            report.add_row(
                row["step"],
                row.get("metrics"),
                **figures,
                extra=row.get("extra"),
                baseline=bool(row.get("baseline")),
            )
        report.meta = dict(data.get("meta") or {})
        for section in data.get("sections") or []:
            report.add_section(Section.from_json(section))
        return report

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write report.json, report.md, the trade-off PNGs and report.html into ``folder``
        (each file atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {"json": folder / "report.json", "markdown": folder / "report.md"}
        write_json(written["json"], self.to_json())
        write_text(written["markdown"], self.to_markdown())
        for key, path in self.plot(folder).items():
            written[key] = path
        written["html"] = self.save_html(folder)
        return written

    def save_html(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/report.html``: self-contained (plots and the folder's PNGs embedded)."""
        return write_html(self, folder)

    def plot(self, folder: str | os.PathLike) -> dict[str, Path]:
        """metric_vs_size.png and metric_vs_latency.png (each only if some row has both figures)."""
        out = {}
        for key, xlabel, ylabel, points in self.tradeoffs():
            path = plot_tradeoff(Path(folder) / f"{key}.png", points, xlabel, ylabel, self.title)
            if path is not None:
                out[key] = path
        return out

    def tradeoffs(self) -> list[tuple[str, str, str, list[Point]]]:
        """``(name, xlabel, ylabel, points)`` of each trade-off plot: metric vs size, vs latency."""
        base = self.baseline
        ylabel = f"{self.task_metric} ({'higher' if self.higher_is_better else 'lower'} is better)"
        out = []
        for key, attr, xlabel, scale in (
            ("metric_vs_size", "size_bytes", "size (MB)", 1e-6),
            ("metric_vs_latency", "latency_ms", "latency (ms)", 1.0),
        ):
            points = [
                Point(
                    r.step,
                    getattr(r, attr) * scale if getattr(r, attr) is not None else None,
                    self.metric(r),
                    r is base,
                )
                for r in self.rows
            ]
            out.append((key, xlabel, ylabel, points))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read a saved report from its folder (or from the report.json file itself)."""
        path = Path(path)
        file = path / "report.json" if path.is_dir() else path
        if not file.is_file():
            raise BadInputError(f"no report found: {file} does not exist")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            return cls.from_json(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{file}: not a slimkit report ({exc})") from exc
