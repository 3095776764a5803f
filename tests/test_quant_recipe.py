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
        "steps": [{"type": "train", "train": FAST_TRAIN}, {"type": "quantize", **quantize}],
        "measure": {"repeats": 3, "warmup": 1, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }


@pytest.mark.parametrize(
    ("quantize", "path"),
    [
        ({"int3": {}}, "steps[1].int3"),
        ({}, "steps[1]"),
        ({"int8_static": {}, "int8_dynamic": {}}, "steps[1].int8_dynamic"),
        ({"weight_only": {"bits": 3}}, "steps[1].weight_only.bits"),
        ({"int8_dynamic": {"bits": 4}}, "steps[1].int8_dynamic.bits"),
        ({"int8_dynamic": {"method": "int8_dynamic"}}, "steps[1].int8_dynamic.method"),
        ({"int8_static": {}, "train": {"epochs": 1}}, "steps[1].train"),
        ({"qat": {}, "train": {"epochs": 0}}, "steps[1].train.epochs"),
        ({"int8_static": {}, "calibration_samples": 0}, "steps[1].calibration_samples"),
        ({"mixed": {"low": {"method": "int3"}, "max_error": 0.1}}, "steps[1].mixed.low.method"),
    ],
)
def test_bad_quantize_steps_name_the_field(tmp_path, quantize, path):
    with pytest.raises(ConfigError) as err:
        parse_recipe(_raw(tmp_path, quantize))
    assert err.value.path == path


def test_quantize_step_runs_and_writes_packed_weights(tmp_path):
    raw = _raw(tmp_path, {"int8_static": {"activation_observer": "percentile"}, "calibration_samples": 128})
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
    raw = _raw(tmp_path, {"mixed": {"low": low, "max_high_layers": 1}, "calibration_samples": 64})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet"]) == 0
    row = json.loads((tmp_path / "run" / "report.json").read_text())["rows"][1]
    assert len(row["extra"]["mixed_kept"]) == 1 and row["extra"]["kept_float"] == row["extra"]["mixed_kept"]
    assert (tmp_path / "run" / row["extra"]["sensitivity_plot"]).stat().st_size > 1000


def _export_raw(tmp_path: Path, model: dict, quantize: dict) -> dict:
    raw = _raw(tmp_path, quantize)
    raw["model"] = model
    raw["steps"].append({"type": "export", "onnxruntime": {"example_samples": 4}})
    return raw


def test_export_step_measures_the_model_on_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    mlp = {"builtin": "lenet300100", "kwargs": {"in_features": 64}}
    raw = _export_raw(tmp_path, mlp, {"int8_dynamic": {"activation_granularity": "tensor"}})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    trained, quantized, exported = json.loads((run / "report.json").read_text())["rows"]
    assert exported["step"] == "export" and exported["extra"]["runtime"] == "onnxruntime"
    assert exported["size_bytes"] == (run / "model.onnx").stat().st_size
    assert exported["size_bytes"] < trained["size_bytes"] / 3  # the int8 codes went into the graph
    assert exported["params"] == trained["params"] and exported["latency_ms"] > 0
    # The same int8 arithmetic in ONNX Runtime: the accuracy moves by at most one test image in a hundred.
    assert abs(exported["metrics"]["accuracy"] - quantized["metrics"]["accuracy"]) <= 0.01


def test_export_must_be_last_and_names_unexportable_layers(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    dynamic = {"int8_dynamic": {"activation_granularity": "tensor"}}
    raw = _export_raw(tmp_path, {"builtin": "digits_cnn", "kwargs": {"width": 8}}, dynamic)
    raw["steps"].append({"type": "evaluate"})
    with pytest.raises(ConfigError) as err:
        parse_recipe(raw)
    assert err.value.path == "steps[2].type" and "last step" in str(err.value)
    raw["steps"].pop()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet"]) != 0
    # Which layers cannot be exported depends on the model: known only when the export step runs.
    assert "features.0 (int8 dynamic Conv2d)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("quantize", "path"),
    [
        ({"int8_dynamic": {}}, "steps[1].int8_dynamic.activation_granularity"),  # per-token scales by default
        ({"bf16": None}, "steps[1].bf16"),
        ({"qat": {"activation_bits": None}, "train": {"epochs": 1}}, "steps[1].qat.activation_bits"),
        (
            {"mixed": {"low": {"method": "int8_dynamic"}, "max_error": 0.01}},
            "steps[1].mixed.low.activation_granularity",
        ),
        (
            {"weight_only": {"bits": 8, "group_size": None, "overrides": {"net.5": {"method": "bf16"}}}},
            "steps[1].weight_only.overrides.net.5.method",
        ),
    ],
)
def test_quantize_steps_that_cannot_be_exported_fail_validation(tmp_path, quantize, path):
    raw = _export_raw(tmp_path, {"builtin": "lenet300100", "kwargs": {"in_features": 64}}, quantize)
    with pytest.raises(ConfigError) as err:
        parse_recipe(raw)
    assert err.value.path == path and "steps[2] exports to onnxruntime" in str(err.value)


def test_quantize_keys_come_from_the_method_table(tmp_path):
    from slimkit.quant import method_names

    names = method_names()
    assert {"int8_dynamic", "int8_static", "weight_only", "qat", "bf16", "mixed"} <= set(names)
    raw = _raw(tmp_path, {"weight_only": {"bits": 4, "group_size": 32}, "calibration_samples": 16})
    raw["steps"].append({"type": "quantize", "name": "qat", "qat": {"weight_bits": 4}})
    recipe = parse_recipe(raw)
    wo, qat = recipe.steps[1].config, recipe.steps[2].config
    assert wo.quant.method == "weight_only" and wo.quant.group_size == 32 and wo.train is None
    assert qat.train is not None and qat.train.epochs == 1  # qat trains one epoch unless told otherwise
    # The resolved recipe writes every default under the method's key and reads back the same.
    resolved = recipe.to_dict()
    step = resolved["steps"][1]
    assert set(step) == {"type", "name", "weight_only", "calibration_samples"}
    assert step["weight_only"]["bits"] == 4 and "method" not in step["weight_only"]
    assert parse_recipe(dict(resolved, output=raw["output"])).to_dict() == resolved


def test_shipped_onnxruntime_recipe_on_a_tiny_encoder(tmp_path, data_dir, capsys):
    """recipes/minilm_int8_onnxruntime.yaml through the real CLI, with a 2-layer BERT for MiniLM."""
    pytest.importorskip("onnxruntime")
    from tests.transfer_helpers import save_tiny_bert

    if not (data_dir / "stsb").exists():
        pytest.skip("STS-B is not in the shared data folder")
    folder = save_tiny_bert(tmp_path / "tiny_bert")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "minilm_int8_onnxruntime.yaml"
    overrides = [
        f"model.hf={folder}",
        f"data.path={data_dir / 'stsb'}",
        f"output={tmp_path / 'run'}",
        "measure.repeats=2",
        "measure.batch_size=16",
    ]
    assert main(["run", str(recipe), *overrides, "--quiet"]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    fp32, int8, exported = json.loads((run / "report.json").read_text())["rows"]
    assert [r["step"] for r in (fp32, int8, exported)] == ["fp32", "int8_dynamic", "onnxruntime_int8"]
    assert exported["size_bytes"] == (run / "model.onnx").stat().st_size < fp32["size_bytes"] / 3
    # int8 is int8 in either runtime: both scores stay within a point of each other and of float's.
    rho = [r["metrics"]["spearman"] for r in (fp32, int8, exported)]
    assert abs(rho[1] - rho[0]) < 1.0 and abs(rho[2] - rho[1]) < 1.0
    assert exported["params"] == int8["params"] == fp32["params"]
