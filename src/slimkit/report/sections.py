"""Extra report sections: a titled table, scatter plot and/or images, beside the steps table.

A section is plain data, kept in report.json (``"sections"``), so report.html can always be
rewritten from the JSON (``slimkit report RUN_DIR --html``). A recipe step adds sections through
its notes (``notes["report_sections"] = [section.to_json(), ...]``: notes must stay JSON for
``--resume``); the runner moves them into the report, tagged with the step's name. A library user
calls :meth:`slimkit.report.Report.add_section`. The search step fills the Pareto front, the
per-layer sensitivity and the chosen per-layer settings this way.

Images are PNG files in the run folder, named without a folder (``"search_sensitivity.png"``):
a report never reads a file outside its own folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from slimkit.errors import ConfigError

NOTES_KEY = "report_sections"
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.png$")


@dataclass(frozen=True)
class Scatter:
    """A scatter plot of two numeric columns of the section's rows (drawn when the report is rendered).

    ``label``: the column naming each point; ``front``: the column whose truthy rows are joined by a
    line (a Pareto front), sorted by x; the section's ``mark`` column picks the highlighted point(s).
    """

    x: str
    y: str
    label: str | None = None
    front: str | None = None
    xlabel: str = ""
    ylabel: str = ""

    def columns(self) -> list[str]:
        return [c for c in (self.x, self.y, self.label, self.front) if c is not None]


@dataclass
class Section:
    """A titled block of report.html: text, a table of ``rows``, a scatter of them, PNG images.

    ``columns``: the table's columns in order (default: the rows' keys, first-seen order).
    ``mark``: a column whose truthy rows are highlighted (the chosen candidate) in table and plot.
    ``key``: a stable id; adding a section with the key of an earlier one replaces it.
    ``step``: the recipe step that added it (set by the runner).
    """

    title: str
    text: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    mark: str | None = None
    scatter: Scatter | None = None
    images: list[str] = field(default_factory=list)
    key: str = ""
    step: str | None = None

    def __post_init__(self) -> None:
        where = f"section {self.title!r}"
        if not isinstance(self.title, str) or not self.title.strip():
            raise ConfigError("section.title", f"must be a non-empty string, got {self.title!r}")
        if not isinstance(self.rows, list) or not all(isinstance(r, dict) for r in self.rows):
            raise ConfigError(f"{where}.rows", "must be a list of mappings (column -> value)")
        if not self.columns:
            self.columns = list(dict.fromkeys(k for row in self.rows for k in row))
        for name in (self.mark, *(self.scatter.columns() if self.scatter else ())):
            if name is not None and name not in self.columns:
                raise ConfigError(f"{where}", f"column {name!r} is not among its columns {self.columns}")
        for name in self.images:
            if not isinstance(name, str) or not _IMAGE_NAME.match(name):
                raise ConfigError(
                    f"{where}.images",
                    f"{name!r}: give the name of a .png file in the run folder, without a folder",
                )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": self.title,
            "text": self.text,
            "columns": list(self.columns),
            "rows": [dict(r) for r in self.rows],
            "mark": self.mark,
            "scatter": None if self.scatter is None else dict(vars(self.scatter)),
            "images": list(self.images),
            "key": self.key,
        }
        if self.step is not None:
            out["step"] = self.step
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Section:
        if not isinstance(data, dict):
            raise ConfigError("section", f"must be a mapping, got {type(data).__name__}")
        scatter = data.get("scatter")
        return cls(
            title=data.get("title", ""),
            text=data.get("text") or "",
            rows=list(data.get("rows") or []),
            columns=list(data.get("columns") or []),
            mark=data.get("mark"),
            scatter=Scatter(**scatter) if isinstance(scatter, dict) else None,
            images=list(data.get("images") or []),
            key=data.get("key") or "",
            step=data.get("step"),
        )
