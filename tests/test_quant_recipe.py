"""The ``quantize`` recipe step: validation with field paths, and a run whose weights file is packed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main
from slimkit.errors import ConfigError
from slimkit.recipes.schema import parse_recipe

FAST_TRAIN = {"epochs": 2, "lr": 0.01, "progress": False}


def _raw(tmp_path: Path, quantize: dict) -> dict:
    return {
        "name": "tiny-quant",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", **FAST_TRAIN}, {"type": "quantize", **quantize}],
        "measure": {"repeats": 3, "warmup": 1, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }


@pytest.mark.parametrize(
    ("quantize", "path"),
    [
        ({"method": "int3"}, "steps[1].method"),
        ({"method": "weight_only", "bits": 3}, "steps[1].bits"),
        ({"method": "int8_dynamic", "bits": 4}, "steps[1].bits"),
        ({"method": "int8_static", "train": {"epochs": 1}}, "steps[1].train"),
        ({"method": "int8_static", "calibration_samples": 0}, "steps[1].calibration_samples"),
    ],
)
def test_bad_quantize_steps_name_the_field(tmp_path, quantize, path):
    with pytest.raises(ConfigError) as err:
        parse_recipe(_raw(tmp_path, quantize))
    assert err.value.path == path


def test_quantize_step_runs_and_writes_packed_weights(tmp_path):
    raw = _raw(
        tmp_path, {"method": "int8_static", "activation_observer": "percentile", "calibration_samples": 128}
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    trained, quantized = report["rows"]
    assert quantized["step"] == "quantize"
    assert quantized["extra"]["quant_method"] == "int8_static" and quantized["extra"]["quantized_layers"] == 4
    assert quantized["size_bytes"] < trained["size_bytes"] / 3  # int8 codes on disk, not float
    assert abs(quantized["metrics"]["accuracy"] - trained["metrics"]["accuracy"]) <= 0.02


@pytest.mark.slow
def test_mixed_quantize_step_saves_the_sensitivity_plot(tmp_path):
    low = {"method": "int8_dynamic", "activation_granularity": "tensor"}
    raw = _raw(tmp_path, {"method": "mixed", "low": low, "max_high_layers": 1, "calibration_samples": 64})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet"]) == 0
    row = json.loads((tmp_path / "run" / "report.json").read_text())["rows"][1]
    assert len(row["extra"]["mixed_kept"]) == 1 and row["extra"]["kept_float"] == row["extra"]["mixed_kept"]
    assert (tmp_path / "run" / row["extra"]["sensitivity_plot"]).stat().st_size > 1000
