"""Recipes and the CLI: validation errors with paths, end-to-end runs checked by numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main
from slimkit.errors import ConfigError
from slimkit.metrics.model import count_parameters
from slimkit.models import DigitsCNN
from slimkit.recipes import load_recipe, parse_recipe, run_recipe
from tests.conftest import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
FAST_TRAIN = {"epochs": 3, "lr": 0.01, "progress": False}


def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tiny(tmp_path: Path, **changes) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "train": dict(FAST_TRAIN)}, {"type": "evaluate"}],
        "measure": {"repeats": 3, "warmup": 1, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }
    recipe.update(changes)
    return recipe


def test_demo_is_among_the_shipped_recipes():
    assert "demo" in [p.stem for p in SHIPPED] and len(SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_is_well_formed(path, tmp_path):
    """Structure and types of every shipped recipe, with or without the data folder (never skipped)."""
    recipe = load_recipe(path, [f"output={tmp_path / 'out'}"], check_paths=False)
    assert recipe.steps and recipe.output == str(tmp_path / "out")
    # The resolved form reads back to the same recipe: it is a valid recipe itself.
    again = parse_recipe(recipe.to_dict(), check_paths=False)
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_validates_with_its_data(path, tmp_path):
    """Fully, paths included: always for recipes without data files (demo), else when the data is here."""
    overrides = [f"output={tmp_path / 'out'}"]
    raw = yaml.safe_load(path.read_text())
    if raw["data"].get("path"):
        data_dir = shared_data_dir()
        if not data_dir.is_dir():
            pytest.skip(f"shared data folder not found: {data_dir} (set SLIMKIT_DATA)")
        overrides.append(f"data.path={data_dir / Path(raw['data']['path']).name}")
    recipe = load_recipe(path, overrides)
    assert recipe.steps and recipe.output == str(tmp_path / "out")


def test_structure_check_skips_only_data_paths(tmp_path):
    raw = _tiny(tmp_path, data={"name": "mnist", "path": str(tmp_path / "no" / "such")})
    with pytest.raises(ConfigError, match="data.path: folder not found"):
        parse_recipe(raw)
    assert parse_recipe(raw, check_paths=False).data.path == str(tmp_path / "no" / "such")
    raw["steps"][0]["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"steps\[0\].train.epochs"):
        parse_recipe(raw, check_paths=False)


def test_demo_recipe_is_shipped_with_the_package():
    from slimkit.cli import shipped_recipe

    assert shipped_recipe("demo").read_text() == (REPO / "recipes" / "demo.yaml").read_text()


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"steps": [{"type": "train", "train": {"epochs": 0}}]},
            "steps[0].train.epochs: must be a positive integer",
        ),
        (
            {"steps": [{"type": "train"}, {"type": "train", "train": {"lr": "fast"}}]},
            "steps[1].train.lr: must be a number",
        ),
        ({"steps": [{"type": "train", "train": {"epoch": 3}}]}, "steps[0].train.epoch: unknown key"),
        ({"steps": [{"type": "train", "train": {}, "foo": 1}]}, "steps[0].foo: unknown key"),
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


OLD_SPELLINGS = [
    ({"type": "train", "epochs": 3}, "steps[0].epochs: training settings are now under 'train:'"),
    (
        {"type": "prune", "structured": {"ratio": 0.5}, "finetune": {"epochs": 1}},
        "steps[0].finetune: recovery training is now 'train:' in every step",
    ),
    (
        {"type": "quantize", "method": "int8_static", "activation_observer": "percentile"},
        "steps[0].method: write the method as a key, e.g. 'int8_static: {activation_observer: percentile}'",
    ),
    (
        {"type": "quantize", "int8_static": {}, "activation_observer": "percentile"},
        "steps[0].activation_observer: unknown key: a quantize step takes one method key",
    ),
    (
        {"type": "distill", "student": {"layers_every": 2}, "temperature": 4},
        "steps[0].temperature: distillation settings are now under 'distill:', e.g. 'distill: {temperature: ...}'",
    ),
    (
        {"type": "finetune", "strategy": "full"},
        "steps[0].strategy: fine-tuning settings are now under 'finetune:'",
    ),
    (
        {"type": "finetune", "finetune": {"strategy": "full", "train": {"epochs": 1}}},
        "steps[0].finetune.train: training settings are the step's own 'train:', beside 'finetune:'",
    ),
    (
        {"type": "multitask", "tasks": [{"name": "a"}, {"name": "b"}]},
        "steps[0].tasks: multi-task settings are now under 'multitask:'",
    ),
    (
        {"type": "export", "runtime": "onnxruntime"},
        "steps[0].runtime: write the runtime as a key, e.g. 'onnxruntime: {threads: 2}'",
    ),
    (
        {"type": "export", "threads": 2},
        "steps[0].threads: ONNX Runtime settings are now under 'onnxruntime:'",
    ),
]


@pytest.mark.parametrize(
    "step,expected", OLD_SPELLINGS, ids=[s["type"] + "-" + e.split(":")[0] for s, e in OLD_SPELLINGS]
)
def test_old_step_spellings_exit_2_naming_the_new_one(tmp_path, capsys, step, expected):
    path = _write(tmp_path, _tiny(tmp_path, steps=[step]))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


def test_missing_recipe_file_and_bad_override(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    path = _write(tmp_path, _tiny(tmp_path))
    assert main(["validate", str(path), "steps.5.train.epochs=2"]) == 2
    assert "steps.5: no such list entry" in capsys.readouterr().err


def test_overrides_are_typed(tmp_path):
    path = _write(tmp_path, _tiny(tmp_path))
    recipe = load_recipe(path, ["steps.0.train.epochs=7", "steps[0].train.lr=0.5", "seed=3"])
    train = recipe.steps[0].config.train
    assert train.epochs == 7 and train.lr == 0.5 and recipe.seed == 3


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
        "report.html",
        "run.log",
        "recipe.resolved.yaml",
        "metric_vs_size.png",
        "metric_vs_latency.png",
    ):
        assert (run / name).stat().st_size > 0, name
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["steps"][0]["train"]["epochs"] == 3
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "train" in capsys.readouterr().out


def test_failed_run_leaves_no_output(tmp_path, capsys, monkeypatch):
    from slimkit.recipes import runner

    def broken(*args):  # fails after every step ran, with the temporary run folder full
        raise RuntimeError("report failed")

    monkeypatch.setattr(runner, "_report", broken)
    path = _write(tmp_path, _tiny(tmp_path))
    assert main(["run", str(path), "--quiet"]) == 1
    assert "internal error: RuntimeError: report failed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # only the state that --resume goes on from (.run.partial): no temp folder, no lock
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] in ([], [".run.partial"])


def test_resolved_recipe_is_what_was_written_plus_defaults_with_or_without_quiet(tmp_path):
    raw = _tiny(tmp_path, overwrite=True)
    raw["steps"][0]["train"].pop("progress")  # progress bars on, unless the run is quiet
    raw["measure"]["latency"] = False
    recipe = parse_recipe(raw)
    before = recipe.to_dict()
    texts = []
    for progress in (True, False):
        out = run_recipe(recipe, progress=progress)
        texts.append((out / "recipe.resolved.yaml").read_text())
    assert texts[0] == texts[1]
    assert recipe.to_dict() == before  # no step changed its config
    resolved = yaml.safe_load(texts[0])
    assert resolved["steps"][0]["train"]["progress"] is True  # as written (the default), not the run's
    assert resolved["steps"][0]["train"]["epochs"] == 3 and resolved["steps"][0]["train"]["batch_size"] == 64
    assert resolved["steps"][1] == {"type": "evaluate", "name": "evaluate"}
    assert parse_recipe(resolved).to_dict() == resolved


def test_step_types_register_once_and_contexts_are_read_only(tmp_path):
    import dataclasses

    from slimkit.recipes import RunContext, StepResult, available_steps, register_step

    expected = {"train", "evaluate", "prune", "quantize", "distill", "finetune", "multitask", "export"}
    assert expected <= set(available_steps())
    with pytest.raises(ValueError, match="'prune' is already registered"):
        register_step("prune", config=dict)(lambda ctx, cfg: StepResult(ctx.model))
    assert available_steps()["prune"].run.__module__ == "slimkit.recipes.steps.prune"
    assert dataclasses.is_dataclass(RunContext) and RunContext.__dataclass_params__.frozen
    step = parse_recipe(_tiny(tmp_path)).steps[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.config.train = None
