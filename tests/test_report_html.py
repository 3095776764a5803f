"""report.html: written by every run, self-contained, the steps table's numbers, escaped, sections."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main
from slimkit.errors import ConfigError
from slimkit.recipes import parse_recipe
from slimkit.recipes.runner import Snapshot, _report
from slimkit.report import Report, plot_series
from slimkit.report.html import render_html
from slimkit.report.sections import NOTES_KEY, Scatter, Section
from tests.html_helpers import Page, image_bytes, markdown_rows, open_in_chromium
from tests.test_recipes import FAST_TRAIN, _tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run: train, magnitude pruning, int8 dynamic quantization (their notes: per-layer data)."""
    tmp = tmp_path_factory.mktemp("html")
    steps = [
        {"type": "train", "train": dict(FAST_TRAIN, epochs=1)},
        {"type": "prune", "magnitude": {"sparsity": 0.5}},
        {"type": "quantize", "int8_dynamic": {}},
    ]
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny(tmp, steps=steps)))
    assert main(["run", str(path), "--quiet"]) == 0
    return tmp / "run"


def _number(cell: str) -> float:
    """``0.9812`` -> 0.9812, ``3.60M`` -> 3.6e6, ``12.3 KB`` -> 12300."""
    match = re.fullmatch(r"([-+]?[0-9.]+) ?(K|M|G|B|KB|MB|GB|ms|x)?", cell)
    unit = (match.group(2) or "").rstrip("B") or "1"
    return float(match.group(1)) * {"1": 1, "K": 1e3, "M": 1e6, "G": 1e9, "ms": 1, "x": 1}[unit]


def test_every_run_writes_a_self_contained_report_html(run):
    text = (run / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert page.errors == []
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", text), "report.html must not reference the network"
    assert "script" not in page.tags and "link" not in page.tags
    # Two trade-off plots (metric vs size, vs latency), each a PNG that decodes.
    assert len(page.images) >= 2
    for image in page.images:
        assert len(image_bytes(image)) > 1000
    assert "machine: " in text and "threads" in text and "recipe: tiny" in text
    assert page.h2[:3] == ["Steps", "Trade-offs", "Step notes"]


def test_steps_table_has_the_numbers_of_report_md_and_json(run):
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    table = page.tables[0]
    assert table == markdown_rows((run / "report.md").read_text(encoding="utf-8"))
    header, body = table[0], table[1:]
    rows = json.loads((run / "report.json").read_text())["rows"]
    steps = [cells[0].rstrip(" *") for cells in body]
    assert steps == [r["step"] for r in rows] == ["train", "prune", "quantize"]
    col = {name: header.index(name) for name in ("accuracy", "size", "MACs", "latency", "speedup")}
    base_latency = rows[0]["latency_ms"]
    for cells, row in zip(body, rows):
        assert _number(cells[col["accuracy"]]) == pytest.approx(row["metrics"]["accuracy"], abs=5e-5)
        assert _number(cells[col["size"]]) == pytest.approx(row["size_bytes"], rel=5e-3)
        assert _number(cells[col["MACs"]]) == pytest.approx(row["macs"], rel=5e-3)
        assert _number(cells[col["latency"]]) == pytest.approx(row["latency_ms"], rel=5e-3)
        speedup = base_latency / row["latency_ms"]
        assert _number(cells[col["speedup"]]) == pytest.approx(speedup, abs=5e-3)


def test_step_notes_show_per_layer_summaries(run):
    text = (run / "report.html").read_text(encoding="utf-8")
    rows = {r["step"]: r for r in json.loads((run / "report.json").read_text())["rows"]}
    layers = rows["prune"]["extra"]["layer_sparsity"]
    assert len(layers) >= 2
    for name, sparsity in layers.items():  # each layer's sparsity, as a table row of its own
        assert f"<tr><th>{name}</th><td>{sparsity:.4f}</td></tr>" in text
    kernels = rows["quantize"]["extra"]["kernels"]
    assert kernels and all(f"<td>{choice}</td>" in text for choice in kernels.values())


def test_report_command_rewrites_the_same_html_from_json(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy), "--html"]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    assert (copy / "report.html").read_bytes() == (run / "report.html").read_bytes()


def _report_with_sections(folder: Path) -> Report:
    report = Report(task_metric="accuracy")
    report.meta = {"recipe": "r", "machine": "machine: test"}
    report.add_row("baseline", {"accuracy": 0.98}, size_bytes=4_000, latency_ms=2.0)
    front = [{"metric": 0.98, "objective": 2.0, "candidate": "fp32"}, {"metric": 0.975, "candidate": "int8"}]
    notes = {"search_front": front}
    report.add_row("search", {"accuracy": 0.975}, size_bytes=1_000, latency_ms=0.5, extra=notes)
    rows = [
        {"candidate": 0, "accuracy": 0.98, "latency_ms": 2.0, "front": True, "chosen": False},
        {"candidate": 1, "accuracy": 0.95, "latency_ms": 1.9, "front": False, "chosen": False},
        {"candidate": 2, "accuracy": 0.975, "latency_ms": 0.5, "front": True, "chosen": True},
    ]
    scatter = Scatter(x="latency_ms", y="accuracy", label="candidate", front="front")
    text = "3 candidates\nfloor met\n\nsecond paragraph"
    report.add_section(
        title="Pareto front", key="pareto", text=text, rows=rows, mark="chosen", scatter=scatter
    )
    plot_series(folder / "sens.png", "sensitivity", "layer", "delta", {"int8": (["a", "b"], [0.1, 0.2])})
    report.add_section(
        Section(
            "Sensitivity",
            rows=[{"layer": "a", "int8": 1e-5, "int8 ms": 0.01234}],
            images=["sens.png", "gone.png"],
        )
    )
    return report


def test_sections_render_table_marked_row_scatter_and_folder_images(tmp_path):
    report = _report_with_sections(tmp_path)
    page = Page(render_html(report, tmp_path))
    assert page.errors == []
    assert page.h2 == ["Steps", "Trade-offs", "Pareto front", "Sensitivity", "Step notes"]
    pareto = page.tables[1]
    assert pareto[0] == ["candidate", "accuracy", "latency_ms", "front", "chosen"]
    assert pareto[3] == ["2", "0.9750", "0.500 ms", "yes", "yes"]
    assert page.tables[2] == [["layer", "int8", "int8 ms"], ["a", "1e-05", "0.0123 ms"]]
    # A step note that is a list of flat records (a search's front) is a table of its own.
    assert page.tables[-1] == [
        ["metric", "objective", "candidate"],
        ["0.9800", "2.0000", "fp32"],
        ["0.9750", "-", "int8"],
    ]
    # 2 trade-offs + the Pareto scatter + sens.png; gone.png is a note, not a broken image.
    assert len(page.images) == 4
    assert image_bytes(page.images[3]) == (tmp_path / "sens.png").read_bytes()
    text = render_html(report, tmp_path)
    assert "gone.png not found in the run folder" in text
    assert text.count('<tr class="marked">') == 1
    assert "<p>3 candidates<br>floor met</p>\n<p>second paragraph</p>" in text


def test_sections_survive_json_and_replace_by_key(tmp_path):
    report = _report_with_sections(tmp_path)
    again = Report.from_json(json.loads(json.dumps(report.to_json())))
    assert render_html(again, tmp_path) == render_html(report, tmp_path)
    old = {k: v for k, v in report.to_json().items() if k not in ("meta", "sections")}  # before report.html
    assert "machine: not recorded" in render_html(Report.from_json(old), tmp_path)
    report.add_section(title="Pareto front (again)", key="pareto", rows=[{"a": 1}])
    assert [s.title for s in report.sections] == ["Pareto front (again)", "Sensitivity"]


def test_bad_sections_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="'chosen' is not among its columns"):
        Section("front", rows=[{"a": 1}], mark="chosen")
    with pytest.raises(ConfigError, match=r"images: '\.\./x\.png'"):
        Section("front", images=["../x.png"])
    with pytest.raises(ConfigError, match="'y' is not among"):
        Section("front", rows=[{"x": 1}], scatter=Scatter(x="x", y="y"))


def test_every_text_is_escaped(tmp_path):
    evil = "<script>alert('x')</script>"
    report = Report(task_metric="accuracy", title=f"t {evil}")
    report.meta = {"recipe": evil, "machine": evil}
    report.add_row(evil, {"accuracy": 0.5}, size_bytes=10, extra={evil: {evil: evil}, "note": evil})
    report.add_section(title=evil, text=evil, rows=[{evil: evil}])
    text = render_html(report, tmp_path)
    page = Page(text)
    assert page.errors == []
    assert "script" not in page.tags
    assert "<script" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert page.tables[0][1][0] == f"{evil} *"  # the browser shows the name as written


def test_a_note_plot_is_embedded_only_from_inside_the_run_folder(tmp_path):
    outside = tmp_path / "secret.png"
    plot_series(outside, "t", "x", "y", {"s": [1.0, 2.0]})
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    plot_series(folder / "quant_sensitivity.png", "t", "x", "y", {"s": [3.0, 1.0]})
    (folder / "fake.png").write_text("not a png")
    notes = {"a_plot": "../secret.png", "b_plot": "link.png", "c_plot": "fake.png"}
    report = Report()
    report.add_row("a", {"accuracy": 1.0}, extra={**notes, "sensitivity_plot": "quant_sensitivity.png"})
    page = Page(render_html(report, folder))
    assert len(page.images) == 1  # as the quantize step names its mixed-precision plot
    assert image_bytes(page.images[0]) == (folder / "quant_sensitivity.png").read_bytes()


def test_runner_moves_step_sections_from_notes_into_the_report(tmp_path):
    recipe = parse_recipe(_tiny(tmp_path), check_paths=False)
    section = Section("Pareto front", rows=[{"candidate": 1, "chosen": True}], mark="chosen")
    figures = {"metrics": {"accuracy": 0.9}, "size_bytes": 10, "params": 5, "nonzero": 5, "macs": 7}
    snapshots = [
        Snapshot("train", {**figures, "extra": {}, "step_time_s": 1.0}, None),
        Snapshot("search", {**figures, "extra": {NOTES_KEY: [section.to_json()]}, "step_time_s": 2.0}, None),
    ]

    class Task:
        metric, higher_is_better = "accuracy", True

    report = _report(snapshots, Task(), recipe)
    assert [(s.title, s.step) for s in report.sections] == [("Pareto front", "search")]
    assert NOTES_KEY not in report.rows[1].extra and report.rows[1].extra["step_time_s"] == 2.0
    assert report.meta["recipe"] == "tiny" and report.meta["machine"].startswith("machine: ")
    assert "3 runs after 1 warm-up, batch 32" in report.meta["measure"]


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not found on PATH (Debian: apt-get install chromium)")
    if shutil.which("bash") is None:
        pytest.skip("bash not found (it hands Chromium its DevTools pipe on fds 3 and 4)")
    return chromium


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(run, tmp_path):
    page, errors = open_in_chromium(
        _chromium(), run / "report.html", str(tmp_path / "profile"), screenshot=tmp_path / "shot.png"
    )
    assert errors == []
    assert page["title"] == "slimkit run: tiny"
    assert page["first_table_rows"] == 4 and page["first_table_width"] > 300  # header + 3 steps
    assert len(page["images"]) >= 2
    assert all(i["complete"] and i["width"] > 100 for i in page["images"]), page["images"]
    assert (tmp_path / "shot.png").stat().st_size > 10_000


@pytest.mark.slow
def test_sections_and_hostile_names_render_in_headless_chromium(tmp_path):
    """Had a name's <script> reached the page, the Content-Security-Policy would log its blocking."""
    report = _report_with_sections(tmp_path)
    report.add_row("<script>alert('x')</script>", {"accuracy": 0.9}, size_bytes=2_000, latency_ms=1.0)
    report.save(tmp_path)
    page, errors = open_in_chromium(_chromium(), tmp_path / "report.html", str(tmp_path / "profile"))
    assert errors == []
    # steps, Pareto front, sensitivity, the search step's notes and its search_front records inside them
    assert page["tables"] == 5 and page["first_table_rows"] == 4
    assert len(page["images"]) == 4  # 2 trade-offs, the Pareto scatter, sens.png
    assert all(i["complete"] and i["width"] > 100 for i in page["images"]), page["images"]
