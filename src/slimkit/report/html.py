"""report.html: one self-contained page per run, beside report.md and report.json.

Everything on the page comes from the report (what report.json holds) and PNG files in the run
folder, so ``slimkit report RUN_DIR --html`` rewrites the same page from the JSON. The page needs
no network and runs no script: plots are embedded as ``data:`` URIs, the style is inline, and a
Content-Security-Policy forbids anything else. Every text is escaped; an image is embedded only
if it is a PNG file (checked by its signature) directly inside the run folder, never a path.

This module reads the report by duck typing (``rows``, ``cells()``, ``tradeoffs()``, ``meta``,
``sections``) rather than importing :mod:`slimkit.report.report`, which imports it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slimkit import __version__
from slimkit.report import formatting as fmt
from slimkit.report.plots import Point, tradeoff_png
from slimkit.report.sections import Section
from slimkit.utils.io import write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 20_000_000  # a bigger "plot" is not a plot: it is left out, with a note
MAX_ITEMS = 500  # longer lists and mappings in step notes are cut (a large LLM has ~200 linear layers)
MAX_DEPTH = 3  # notes nested deeper than this are shown as JSON text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1b1b1b; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; } h3 { font-size: 1rem; }
p.meta { color: #444; margin: 0.2rem 0; font-size: 0.9rem; }
div.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.baseline td, tr.marked td { background: #fff4d6; font-weight: 600; }
figure { display: inline-block; margin: 0.5rem 1rem 0.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.8rem; color: #555; }
p.missing { color: #a33; }
pre { background: #f7f7f7; padding: 0.4rem; max-height: 20rem; overflow: auto; font-size: 0.8rem; }
details > summary { cursor: pointer; color: #333; }
"""
NUMBER = '<td class="num">'
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def write_html(report: Any, folder: str | os.PathLike) -> Path:
    """Write ``folder/report.html`` atomically; images named by the report are read from ``folder``."""
    path = Path(folder) / "report.html"
    write_text(path, render_html(report, folder))
    return path


def render_html(report: Any, folder: str | os.PathLike | None = None) -> str:
    """The page as a string (``folder``: where the sections' and notes' PNG files are; None: none)."""
    where = Path(folder) if folder is not None else None
    title = report.title or f"slimkit run: {report.meta.get('recipe') or 'report'}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        _about(report),
        _steps(report),
        _tradeoffs(report),
        *(_section(s, where) for s in report.sections),
        _notes(report, where),
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _about(report: Any) -> str:
    meta = report.meta
    arrow = "higher" if report.higher_is_better else "lower"
    base = report.baseline
    lines = [
        f"recipe: {meta.get('recipe') or '-'}",
        meta.get("machine") or "machine: not recorded",
        meta.get("measure") or "",
        f"task metric: {report.task_metric} ({arrow} is better); baseline: {base.step if base else '-'}",
        f"written by slimkit {__version__}",
    ]
    return "\n".join(f'<p class="meta">{esc(line)}</p>' for line in lines if line)


def _table(header: list[str], body: Iterable[list[str]], classes: Iterable[str] = ()) -> str:
    """A table of already formatted (not yet escaped) text; the first column left-aligned."""
    classes = list(classes)
    out = ['<div class="scroll"><table>', "<thead><tr>"]
    out += [f"<th>{esc(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for i, cells in enumerate(body):
        css = f' class="{esc(classes[i])}"' if i < len(classes) and classes[i] else ""
        out.append(f"<tr{css}>")
        out += [(NUMBER if j else "<td>") + f"{esc(c)}</td>" for j, c in enumerate(cells)]
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _steps(report: Any) -> str:
    header, body = report.cells()
    classes = ["baseline" if r is report.baseline else "" for r in report.rows]
    return "<h2>Steps</h2>\n" + _table(header, body, classes)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
        f"<figcaption>{esc(alt)}</figcaption></figure>"
    )


def _tradeoffs(report: Any) -> str:
    figures = []
    for key, xlabel, ylabel, points in report.tradeoffs():
        png = tradeoff_png(points, xlabel, ylabel, report.title)
        if png is not None:
            figures.append(_img(png, f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]} ({key})"))
    if not figures:
        return "<h2>Trade-offs</h2>\n<p>No step has both the metric and a size or latency measured.</p>"
    return "<h2>Trade-offs</h2>\n<div>" + "".join(figures) + "</div>"


def folder_png(folder: Path | None, name: Any) -> tuple[bytes | None, str]:
    """``(png bytes, "")`` for a PNG file directly in ``folder``, else ``(None, why not)``."""
    if folder is None:
        return None, "no run folder given"
    if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
        return None, f"{name!r} is not a file name in the run folder"
    path = folder / name
    if path.is_symlink() or not path.is_file():
        return None, f"{name} not found in the run folder"
    if path.stat().st_size > MAX_IMAGE_BYTES:
        return None, f"{name} is over {MAX_IMAGE_BYTES // 1_000_000} MB, left out"
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return None, f"{name} is not a PNG file"
    return data, ""


def _folder_img(folder: Path | None, name: Any) -> str:
    png, why = folder_png(folder, name)
    return _img(png, str(name)) if png is not None else f'<p class="missing">{esc(why)}</p>'


def format_cell(column: str, value: Any) -> str:
    """A table cell by its column's name: sizes, times, counts and ratios as in the steps table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return fmt.MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        name = column.lower().replace(" ", "_")  # "int8 ms" reads as "int8_ms"
        if name.endswith("bytes") or name == "size":
            return fmt.format_bytes(value)
        if name.endswith("_ms") or name in ("latency", "p95"):
            return fmt.format_ms(value)
        if name.endswith("time_s"):
            return f"{value:.2f} s"
        if name in ("macs", "params", "nonzero") or name.endswith(("_macs", "_params")):
            return fmt.format_count(value)
        if name in ("speedup", "compression") or name.endswith(("_speedup", "_compression")):
            return fmt.format_ratio(value)
        if isinstance(value, float) and 0 < abs(value) < 1e-3:
            return f"{value:.3g}"  # sensitivities and errors: 4 decimals would show 0.0000
        return fmt.format_metric(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)[:200]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _section(section: Section, folder: Path | None) -> str:
    out = [f"<h2>{esc(section.title)}</h2>"]
    if section.step:
        out.append(f'<p class="meta">from step {esc(section.step)}</p>')
    # Blank lines part paragraphs; a single newline is a line break (a summary's lines).
    for para in section.text.split("\n\n"):
        if para.strip():
            out.append("<p>" + "<br>".join(esc(line) for line in para.strip().split("\n")) + "</p>")
    if section.rows:
        body = [[format_cell(c, row.get(c)) for c in section.columns] for row in section.rows]
        marked = ["marked" if section.mark and row.get(section.mark) else "" for row in section.rows]
        out.append(_table(section.columns, body, marked))
    if section.scatter is not None:
        out.append(_scatter(section))
    out += [_folder_img(folder, name) for name in section.images]
    return "\n".join(out)


def _scatter(section: Section) -> str:
    sc = section.scatter
    points, front = [], []
    for i, row in enumerate(section.rows):
        label = str(row.get(sc.label, "")) if sc.label else str(i)
        marked = bool(section.mark and row.get(section.mark))
        point = Point(label, _number(row.get(sc.x)), _number(row.get(sc.y)), marked)
        points.append(point)
        if sc.front and row.get(sc.front):
            front.append(point)
    xlabel, ylabel = sc.xlabel or sc.x, sc.ylabel or sc.y
    png = tradeoff_png(points, xlabel, ylabel, section.title, ("points", section.mark or "marked"), front)
    if png is None:
        return f'<p class="missing">no row has numbers in both {esc(sc.x)} and {esc(sc.y)}</p>'
    return _img(png, f"{section.title}: {ylabel} vs {xlabel}")


def _notes(report: Any, folder: Path | None) -> str:
    """Each step's notes (report.json's ``extra``): per-layer sparsity, kernels, plots, ..."""
    blocks = []
    for row in report.rows:
        if row.extra:
            items = [(k, _value(k, v, folder, 1)) for k, v in row.extra.items()]
            blocks.append(f"<h3>{esc(row.step)}</h3>\n" + _pairs(items))
    return "<h2>Step notes</h2>\n" + "\n".join(blocks) if blocks else ""


def _pairs(items: list[tuple[str, str]]) -> str:
    """A key / value table whose values are HTML already."""
    out = ['<div class="scroll"><table><tbody>']
    out += [f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in items]
    out.append("</tbody></table></div>")
    return "".join(out)


def _value(key: str, value: Any, folder: Path | None, depth: int) -> str:
    """One note as HTML: a plot file embedded, a mapping as a nested table, a list as text."""
    if key.endswith("_plot") and isinstance(value, str):
        return _folder_img(folder, value)
    if isinstance(value, dict) and value and depth < MAX_DEPTH:
        shown = list(value.items())[:MAX_ITEMS]
        items = [(str(k), _value(str(k), v, folder, depth + 1)) for k, v in shown]
        table = _pairs(items) + _cut(len(value))
        if len(value) <= 12:
            return table
        return f"<details><summary>{len(value)} entries</summary>{table}</details>"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        text = ", ".join(format_cell(key, v) for v in value[:MAX_ITEMS])
        return esc(text or "(none)") + _cut(len(value))
    if _records(value):  # a list of flat mappings (a search's front, pruned groups): a table
        columns = list(dict.fromkeys(k for row in value for k in row))
        body = [[format_cell(c, row.get(c)) for c in columns] for row in value[:MAX_ITEMS]]
        return _table(columns, body) + _cut(len(value))
    if isinstance(value, (dict, list, tuple)):
        return f"<pre>{esc(json.dumps(value, indent=1, default=str)[:20_000])}</pre>"
    return esc(format_cell(key, value))


def _records(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(
            isinstance(r, dict) and not any(isinstance(v, (dict, list)) for v in r.values()) for r in value
        )
    )


def _cut(count: int) -> str:
    return f" <em>({count - MAX_ITEMS} more not shown)</em>" if count > MAX_ITEMS else ""
