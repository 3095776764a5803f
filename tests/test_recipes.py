"""Recipes and the CLI: validation errors with paths, end-to-end runs checked by numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main
from slimkit.metrics.model import count_parameters
from slimkit.models import DigitsCNN
from slimkit.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tiny(tmp_path: Path, **changes) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "epochs": 3, "lr": 0.01, "progress": False}, {"type": "evaluate"}],
        "measure": {"repeats": 3, "warmup": 1, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }
    recipe.update(changes)
    return recipe


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_validates(path, tmp_path, data_dir):
    overrides = [f"output={tmp_path / 'out'}"]
    raw = yaml.safe_load(path.read_text())
    if raw["data"].get("path"):
        overrides.append(f"data.path={data_dir / Path(raw['data']['path']).name}")
    recipe = load_recipe(path, overrides)
    assert recipe.steps and recipe.output == str(tmp_path / "out")


def test_demo_recipe_is_shipped_with_the_package():
    from slimkit.cli import shipped_recipe

    assert shipped_recipe("demo").read_text() == (REPO / "recipes" / "demo.yaml").read_text()


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"steps": [{"type": "train", "epochs": 0}]}, "steps[0].epochs: must be a positive integer"),
        ({"steps": [{"type": "train"}, {"type": "train", "lr": "fast"}]}, "steps[1].lr: must be a number"),
        ({"steps": [{"type": "train", "epoch": 3}]}, "steps[0].epoch: unknown key"),
        ({"steps": [{"type": "shrink"}]}, "steps[0].type: unknown step type 'shrink'"),
        ({"steps": []}, "steps: must be a non-empty list"),
        ({"model": {"builtin": "resnet9000"}}, "model.builtin: must be one of"),
        ({"model": {"builtin": "lenet5", "weights": "missing.safetensors"}}, "model.weights: file not found"),
        ({"data": {"name": "mnist", "path": "no/such/folder"}}, "data.path: folder not found"),
        ({"data": {"name": "digits", "val_fraction": 1.5}}, "data.val_fraction: must be in [0.0, 1.0)"),
        ({"measure": {"threads": -1}}, "measure.threads: must be a positive integer"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_bad_recipes_exit_2_naming_the_field(tmp_path, capsys, change, expected):
    path = _write(tmp_path, _tiny(tmp_path, **change))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file_and_bad_override(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    path = _write(tmp_path, _tiny(tmp_path))
    assert main(["validate", str(path), "steps.5.epochs=2"]) == 2
    assert "steps.5: no such list entry" in capsys.readouterr().err


def test_overrides_are_typed(tmp_path):
    path = _write(tmp_path, _tiny(tmp_path))
    recipe = load_recipe(path, ["steps.0.epochs=7", "steps[0].lr=0.5", "seed=3"])
    assert recipe.steps[0].config.epochs == 7 and recipe.steps[0].config.lr == 0.5 and recipe.seed == 3


def test_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    path = _write(tmp_path, _tiny(tmp_path))
    assert main(["validate", str(path)]) == 2
    assert "output:" in capsys.readouterr().err


def test_cli_run_end_to_end_checks_report_numbers(tmp_path, capsys):
    path = _write(tmp_path, _tiny(tmp_path))
    assert main(["run", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    rows = report["rows"]
    assert [r["step"] for r in rows] == ["train", "evaluate"]
    train = rows[0]
    assert train["metrics"]["accuracy"] > 0.85
    # the size figure is the real size of the saved weights
    assert train["size_bytes"] == os.path.getsize(run / "model.safetensors")
    assert train["params"] == count_parameters(DigitsCNN(width=8))
    assert train["macs"] > 0 and train["latency_ms"] > 0
    assert rows[1]["metrics"]["accuracy"] == pytest.approx(train["metrics"]["accuracy"])
    for name in (
        "report.md",
        "run.log",
        "recipe.resolved.yaml",
        "metric_vs_size.png",
        "metric_vs_latency.png",
    ):
        assert (run / name).stat().st_size > 0, name
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["steps"][0]["epochs"] == 3
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "train" in capsys.readouterr().out


def test_failed_run_leaves_no_output(tmp_path, capsys):
    recipe = _tiny(tmp_path)
    recipe["steps"][0]["monitor"] = "val_no_such_metric"
    path = _write(tmp_path, recipe)
    with pytest.raises(KeyError):
        main(["run", str(path), "--quiet"])
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
