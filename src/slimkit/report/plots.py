"""PNG plots for reports, drawn with matplotlib's Agg canvas.

Figures are built with the object-oriented API on an Agg canvas created in
the function, so importing slimkit never selects or changes the process-wide
matplotlib backend (pyplot is not used), and drawing works without a display.
Files are written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from slimkit.utils.io import atomic_path


@dataclass
class Point:
    """One labelled point of a trade-off plot."""

    label: str
    x: float
    y: float
    baseline: bool = False


def _figure(width: float = 6.4, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _png(fig) -> bytes:
    """The figure as PNG bytes (report.html embeds plots without writing files)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _usable(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def plot_tradeoff(
    path: str | os.PathLike, points: Sequence[Point], xlabel: str, ylabel: str, title: str = ""
) -> Path | None:
    """Scatter of metric (y) against cost (x), each point labelled, the baseline a star.

    Points with a missing coordinate are left out; returns None (and writes
    nothing) when no point remains. The x axis turns logarithmic when the
    costs span more than 20x.
    """
    fig = _tradeoff_figure(points, xlabel, ylabel, title)
    return None if fig is None else _save(fig, path)


def tradeoff_png(
    points: Sequence[Point],
    xlabel: str,
    ylabel: str,
    title: str = "",
    names: tuple[str, str] = ("steps", "baseline"),
    front: Sequence[Point] = (),
) -> bytes | None:
    """:func:`plot_tradeoff` as PNG bytes; ``names``: the legend's words for the points and for the
    starred ones; ``front`` (a Pareto front) is drawn as a line through its points in x order."""
    fig = _tradeoff_figure(points, xlabel, ylabel, title, names, front)
    return None if fig is None else _png(fig)


def _tradeoff_figure(
    points: Sequence[Point],
    xlabel: str,
    ylabel: str,
    title: str,
    names: tuple[str, str] = ("steps", "baseline"),
    front: Sequence[Point] = (),
):
    points = [p for p in points if _usable(p.x) and _usable(p.y)]
    if not points:
        return None
    fig, ax = _figure()
    line = sorted((p for p in front if _usable(p.x) and _usable(p.y)), key=lambda p: p.x)
    if line:
        ax.plot([p.x for p in line], [p.y for p in line], "-", color="tab:green", alpha=0.6, label="front")
    others = [p for p in points if not p.baseline]
    if others:
        ax.plot([p.x for p in others], [p.y for p in others], "o", color="tab:blue", label=names[0])
    stars = [p for p in points if p.baseline]
    if stars:
        ax.plot(
            [p.x for p in stars], [p.y for p in stars], "*", color="tab:red", markersize=16, label=names[1]
        )
    for p in points:
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    xs = [p.x for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


Series = Sequence[float] | tuple[Sequence, Sequence[float]]


def _xy(values: Series) -> tuple[list, list[float]]:
    if isinstance(values, tuple) and len(values) == 2 and isinstance(values[1], Sequence):
        xs, ys = values
        if len(xs) != len(ys):
            raise ValueError(f"series has {len(xs)} x values but {len(ys)} y values")
        return list(xs), list(ys)
    return list(range(len(values))), list(values)


def plot_series(
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Mapping[str, Series],
    kind: str = "line",
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """Line or grouped-bar plot of named series.

    Each series is a list of y values (x = 0, 1, ...) or a tuple ``(xs, ys)``;
    x values may be strings (layer names), which become category ticks.
    Example: per-layer sensitivity,
    ``plot_series(p, "Sensitivity", "layer", "accuracy", {"50%": (layers, acc50), "90%": (layers, acc90)})``.
    """
    if kind not in ("line", "bar"):
        raise ValueError(f"kind: must be 'line' or 'bar', got {kind!r}")
    if not series:
        raise ValueError("plot_series: no series to plot")
    data = {name: _xy(values) for name, values in series.items()}
    fig, ax = _figure(width=max(6.4, 0.25 * max(len(xs) for xs, _ in data.values())))
    if kind == "line":
        for name, (xs, ys) in data.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    else:
        _bars(ax, data)
    if any(isinstance(x, str) for xs, _ in data.values() for x in xs):
        for tick in ax.get_xticklabels():
            tick.set_rotation(60)
            tick.set_horizontalalignment("right")
            tick.set_fontsize(7)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(data) > 1:
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _bars(ax, data: dict[str, tuple[list, list[float]]]) -> None:
    """Grouped bars: one group per x value (in first-seen order), one bar per series."""
    categories: list = []
    for xs, _ in data.values():
        categories += [x for x in xs if x not in categories]
    width = 0.8 / len(data)
    for i, (name, (xs, ys)) in enumerate(data.items()):
        positions = [categories.index(x) + (i - (len(data) - 1) / 2) * width for x in xs]
        ax.bar(positions, ys, width=width, label=name)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels([str(c) for c in categories])
