"""Report: derived columns, formatting, JSON round trip, saved files and plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from slimkit.errors import SlimkitError
from slimkit.report import Report, plot_series
from slimkit.report.formatting import (
    format_bytes,
    format_count,
    format_delta,
    format_metric,
    format_ms,
    format_ratio,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report() -> Report:
    report = Report(task_metric="accuracy", higher_is_better=True, title="LeNet on MNIST")
    report.add_row(
        "baseline",
        {"accuracy": 0.98, "loss": 0.07},
        size_bytes=1_066_928,
        params=266_610,
        nonzero=266_610,
        macs=266_200,
        latency_ms=2.0,
        p95_ms=2.5,
    )
    report.add_row(
        "prune",
        {"accuracy": 0.975, "loss": 0.08},
        size_bytes=266_732,
        params=266_610,
        nonzero=26_661,
        macs=266_200,
        latency_ms=0.5,
        p95_ms=0.7,
        extra={"sparsity": 0.9},
    )
    report.add_row("quantize", {"accuracy": 0.97}, size_bytes=None, latency_ms=None)
    return report


def test_derived_columns():
    report = _report()
    base, pruned, quant = report.rows
    assert report.baseline is base
    assert report.derived(base) == {"delta": 0.0, "compression": 1.0, "speedup": 1.0, "sparsity": 0.0}
    d = report.derived(pruned)
    assert d["delta"] == pytest.approx(-0.005)
    assert d["compression"] == pytest.approx(1_066_928 / 266_732)
    assert d["speedup"] == pytest.approx(4.0)
    assert d["sparsity"] == pytest.approx(0.9)
    dq = report.derived(quant)
    assert dq["delta"] == pytest.approx(-0.01)
    assert dq["compression"] is None and dq["speedup"] is None and dq["sparsity"] is None


def test_flagged_baseline_is_the_reference():
    report = Report(task_metric="perplexity", higher_is_better=False)
    report.add_row("warm-up", {"perplexity": 40.0}, size_bytes=500, latency_ms=1.0)
    report.add_row("dense", {"perplexity": 30.0}, size_bytes=1000, latency_ms=3.0, baseline=True)
    assert report.baseline.step == "dense"
    d = report.derived(report.rows[0])
    assert d == {"delta": 10.0, "compression": 2.0, "speedup": 3.0, "sparsity": None}
    with pytest.raises(ValueError, match="already has a baseline"):
        report.add_row("again", baseline=True)
    with pytest.raises(ValueError, match="step"):
        report.add_row("")


def test_table_and_markdown_show_steps_and_formatted_numbers():
    report = _report()
    table = report.to_table()
    lines = table.splitlines()
    assert lines[0] == "LeNet on MNIST"
    assert lines[1].split()[:3] == ["step", "accuracy", "delta"]
    for step in ("baseline *", "prune", "quantize"):
        assert any(line.startswith(step) for line in lines[3:])
    prune_line = next(line for line in lines if line.startswith("prune"))
    for cell in ("0.9750", "-0.0050", "267 KB", "4.00x", "266.6K", "26.66K", "90.0%", "0.500 ms", "0.700 ms"):
        assert f" {cell}" in prune_line, cell
    quant_line = next(line for line in lines if line.startswith("quantize"))
    assert quant_line.split()[1:3] == ["0.9700", "-0.0100"]
    assert quant_line.split().count("-") >= 8  # loss, size, compression, params, ... speedup
    # every line of the body has the same width once aligned (last column right-aligned)
    assert len({len(line) for line in lines[1:]}) == 1
    md = report.to_markdown()
    assert "| step | accuracy | delta | loss | size |" in md
    assert "| prune | 0.9750 | -0.0050 | 0.0800 | 267 KB | 4.00x |" in md
    assert str(report) == table


def test_formatting():
    assert format_bytes(950) == "950 B"
    assert format_bytes(12_345) == "12.3 KB"
    assert format_bytes(1_066_928) == "1.07 MB"
    assert format_bytes(90_000_000) == "90.0 MB"
    assert format_bytes(123_456_789) == "123 MB"
    assert format_bytes(None) == "-"
    assert (
        format_count(266_610) == "266.6K"
        and format_count(22_713_216) == "22.71M"
        and format_count(42) == "42"
    )
    assert (
        format_ms(1.2345) == "1.23 ms"
        and format_ms(0.012345) == "0.0123 ms"
        and format_ms(1234.5) == "1234 ms"
    )
    assert format_ratio(3.1234) == "3.12x" and format_ratio(math.nan) == "-"
    assert (
        format_metric(0.98123) == "0.9812" and format_metric(123.45) == "123.5" and format_metric(None) == "-"
    )
    assert format_delta(0.0012) == "+0.0012" and format_delta(-0.015) == "-0.0150"


def test_json_round_trip_and_saved_files(tmp_path):
    report = _report()
    report.rows[2].metrics["pearson"] = math.nan  # undefined metrics must still give strict JSON
    written = report.save(tmp_path / "run")
    assert set(written) == {"json", "markdown", "metric_vs_size", "metric_vs_latency", "html"}
    data = json.loads((tmp_path / "run" / "report.json").read_text(), parse_constant=_reject)
    assert data["baseline"] == "baseline" and data["rows"][1]["derived"]["speedup"] == 4.0
    assert data["rows"][2]["metrics"]["pearson"] is None
    loaded = Report.load(tmp_path / "run")
    assert loaded.to_json() == report.to_json()
    assert loaded.to_table() == report.to_table()
    assert Report.load(tmp_path / "run" / "report.json").rows[1].extra == {"sparsity": 0.9}
    assert (tmp_path / "run" / "report.md").read_text() == report.to_markdown()
    for name in ("metric_vs_size.png", "metric_vs_latency.png"):
        blob = (tmp_path / "run" / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5_000
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp files left


def _reject(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_plots_skipped_without_figures_and_bad_reports(tmp_path):
    report = Report()
    report.add_row("only-metric", {"accuracy": 0.5})
    assert set(report.save(tmp_path)) == {"json", "markdown", "html"}
    with pytest.raises(SlimkitError, match="no report found"):
        Report.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json")
    with pytest.raises(SlimkitError, match="not a slimkit report"):
        Report.load(tmp_path / "bad")


def test_plot_series_line_and_bar(tmp_path):
    layers = ["net.1", "net.4", "net.7"]
    line = plot_series(
        tmp_path / "line.png", "Loss", "epoch", "loss", {"train": [1.0, 0.5, 0.3], "val": [1.1, 0.7, 0.6]}
    )
    bars = plot_series(
        tmp_path / "bars.png",
        "Sensitivity",
        "layer",
        "accuracy",
        {"50%": (layers, [0.97, 0.98, 0.96]), "90%": (layers, [0.80, 0.95, 0.70])},
        kind="bar",
    )
    for path in (line, bars):
        blob = path.read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5_000
    with pytest.raises(ValueError, match="kind"):
        plot_series(tmp_path / "x.png", "t", "x", "y", {"a": [1.0]}, kind="pie")
    with pytest.raises(ValueError, match="2 x values but 3 y values"):
        plot_series(tmp_path / "x.png", "t", "x", "y", {"a": ([1, 2], [1.0, 2.0, 3.0])})


def test_importing_does_not_touch_matplotlib():
    code = "import sys, slimkit.report, slimkit.metrics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
