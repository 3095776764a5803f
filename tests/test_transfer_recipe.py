"""The finetune and multitask recipe steps, end to end on a tiny encoder and the real text data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main
from slimkit.recipes import load_recipe
from tests.transfer_helpers import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _recipe(tmp_path: Path, model: Path, data: dict, steps: list[dict]) -> Path:
    recipe = {
        "name": "transfer",
        "model": {"hf": str(model)},
        "data": data,
        "steps": steps,
        "measure": {"repeats": 2, "warmup": 1, "batch_size": 8, "max_length": 32},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.003, "progress": False}


def test_finetune_steps_source_then_target(tmp_path, tiny_folder, data_dir, capsys):
    """yelp (source) -> amazon (target, 64 labelled examples), scored on amazon after each step."""
    target = {"name": "sentiment", "path": str(data_dir), "domain": "amazon"}
    steps = [
        {
            "type": "finetune",
            "name": "yelp",
            "finetune": {
                "strategy": "full",
                "data": {"name": "sentiment", "path": str(data_dir), "domain": "yelp"},
                "n_train": 96,
            },
            "train": dict(TRAIN, epochs=1),
        },
        {
            "type": "finetune",
            "name": "amazon_lora",
            "finetune": {"strategy": "lora", "n_train": 64},
            "train": TRAIN,
        },
    ]
    path = _recipe(tmp_path, tiny_folder, target, steps)
    assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert [r["step"] for r in rows] == ["yelp", "amazon_lora"]
    first, second = rows[0]["extra"], rows[1]["extra"]
    assert first["train_data"] == "sentiment-yelp" and first["n_train"] == 96
    assert second["train_data"] == "sentiment-amazon" and second["n_train"] == 64
    assert second["lora_merged_layers"] == 4 and second["trainable_params"] < first["trainable_params"]
    # a merged LoRA model has exactly the parameters of the model it started from
    assert rows[1]["params"] == rows[0]["params"]
    for row in rows:
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0 and row["size_bytes"] > 0


def test_multitask_step_trec_coarse_and_fine(tmp_path, tiny_folder, data_dir, capsys):
    data = {"name": "trec", "path": str(data_dir), "label": "coarse"}
    fine = {"name": "trec", "path": str(data_dir), "label": "fine"}
    step = {
        "type": "multitask",
        "multitask": {
            "tasks": [{"name": "coarse"}, {"name": "fine", "data": fine}],
            "weighting": "uncertainty",
            "sampling": "temperature",
            "steps_per_epoch": 6,
        },
        "train": dict(TRAIN, monitor="val_score"),
    }
    path = _recipe(tmp_path, tiny_folder, data, [step])
    assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    extra = row["extra"]
    assert extra["default_task"] == "coarse" and extra["epochs"] == 2
    # the report's metric is the coarse head on TREC_10, the same figure the step measured for its task
    assert row["metrics"]["accuracy"] == pytest.approx(extra["coarse_accuracy"], abs=1e-4)
    assert 0.0 <= extra["fine_accuracy"] <= 1.0
    assert extra["coarse_weight"] != 1.0  # learned uncertainty weights


@pytest.mark.parametrize(
    "steps,expected",
    [
        (
            [{"type": "multitask", "multitask": {"tasks": [{"name": "a"}, {"name": "a"}]}}],
            "steps[0].multitask.tasks[1].name: 'a' is already the name of tasks[0]",
        ),
        (
            [{"type": "multitask", "multitask": {"tasks": [{"name": "a"}, {"name": "b"}]}}],
            "steps[0].multitask.tasks: exactly one task must leave out data",
        ),
        ([{"type": "multitask"}], "steps[0].multitask: is required"),
        (
            [{"type": "finetune", "finetune": {"strategy": "sideways"}}],
            "steps[0].finetune.strategy: must be one of",
        ),
        (
            [
                {
                    "type": "finetune",
                    "finetune": {"strategy": "gradual", "unfreeze_every": 3},
                    "train": {"epochs": 3},
                }
            ],
            "steps[0].finetune.unfreeze_every: unfreezing every 3 epochs never unfreezes",
        ),
        (
            [{"type": "finetune", "finetune": {"lora": {"target_modules": []}}}],
            "steps[0].finetune.lora.target_modules: must be",
        ),
        (  # matched against the encoder built from its config.json (no weights read)
            [
                {
                    "type": "finetune",
                    "finetune": {
                        "strategy": "lora",
                        "lora": {"target_modules": ["*.query", "*.no_such_layer"]},
                    },
                }
            ],
            "steps[0].finetune.lora.target_modules[1]: pattern '*.no_such_layer' matches no Linear layer",
        ),
    ],
)
def test_bad_steps_are_caught_at_validation(tmp_path, tiny_folder, data_dir, capsys, steps, expected):
    data = {"name": "sst2", "path": str(data_dir)}
    path = _recipe(tmp_path, tiny_folder, data, steps)
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "step,expected",
    [
        (
            {"head": {"num_labels": 3}},
            "steps[0].finetune.head.num_labels: the head has 3 outputs but sst2 has 2 classes",
        ),
        (
            {"strategy": "gradual", "unfreeze_unit": "step", "unfreeze_every": 20},
            "steps[0].finetune.unfreeze_every: unfreezing 3",
        ),
    ],
)
def test_model_dependent_errors_stop_the_run_before_training(
    tmp_path, tiny_folder, data_dir, capsys, step, expected
):
    step = {"type": "finetune", "finetune": {"strategy": "lora", **step}, "train": dict(TRAIN, epochs=1)}
    path = _recipe(tmp_path, tiny_folder, {"name": "sst2", "path": str(data_dir)}, [step])
    load_recipe(path)  # valid as far as the file goes
    assert main(["run", str(path), "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
