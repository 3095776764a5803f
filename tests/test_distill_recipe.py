"""The ``distill`` recipe step: validation with field paths, and a run whose report row is the student's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main
from slimkit.distill.students import MLP
from slimkit.metrics.model import count_parameters
from slimkit.models import DigitsCNN

FAST_TRAIN = {"epochs": 2, "lr": 0.01, "progress": False}


def _recipe(tmp_path: Path, distill: dict) -> Path:
    recipe = {
        "name": "tiny-distill",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "train": FAST_TRAIN}, {"type": "distill", **distill}],
        "measure": {"repeats": 3, "warmup": 1, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_distill_step_report_row_is_the_student(tmp_path, capsys):
    student = {"builtin": "mlp", "kwargs": {"hidden": [32]}}
    path = _recipe(
        tmp_path, {"student": student, "distill": {"temperature": 3.0}, "train": {**FAST_TRAIN, "epochs": 3}}
    )
    assert main(["run", str(path), "--quiet"]) == 0
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert [r["step"] for r in rows] == ["train", "distill"]
    teacher, row = rows
    assert teacher["params"] == count_parameters(DigitsCNN(width=8))
    assert row["params"] == count_parameters(MLP(64, 10, hidden=[32]))
    assert row["extra"]["teacher_params"] == teacher["params"]
    assert row["extra"]["output_loss"] == "kd" and row["extra"]["temperature"] == 3.0
    assert row["extra"]["epochs"] == 3 and row["extra"]["distill_output"] >= 0
    assert row["metrics"]["accuracy"] > 0.7


def test_pruned_copy_of_the_teacher_as_student(tmp_path):
    student = {"prune": {"ratio": 0.5, "importance": "l1"}}
    path = _recipe(tmp_path, {"student": student, "distill": {"alpha": 0.5}, "train": FAST_TRAIN})
    assert main(["run", str(path), "--quiet"]) == 0
    teacher, row = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert row["params"] < 0.45 * teacher["params"] and row["extra"]["teacher_params"] == teacher["params"]
    assert row["metrics"]["accuracy"] > 0.7


@pytest.mark.parametrize(
    ("distill", "expected"),
    [
        ({}, "steps[1].student: is required"),
        ({"student": "current"}, "steps[1].teacher: student 'current' needs another model"),
        ({"student": {"builtin": "resnet"}}, "steps[1].student.builtin: must be one of"),
        ({"student": {"builtin": "mlp", "layers_every": 2}}, "steps[1].student.builtin: name the student"),
        ({"student": {"layers_every": 0}}, "steps[1].student.layers_every: must be a positive integer"),
        ({"student": {"prune": {"ratio": 1.5}}}, "steps[1].student.prune.ratio: must be in"),
        ({"student": "current", "teacher": {"builtin": "nope"}}, "steps[1].teacher.builtin: must be one of"),
        (
            {"student": {"layers_every": 2}, "distill": {"temperature": 0}},
            "steps[1].distill.temperature: must be > 0",
        ),
        ({"student": {"layers_every": 2}, "distill": {"alpha": 1.5}}, "steps[1].distill.alpha: must be in"),
        (
            {"student": {"layers_every": 2}, "distill": {"output_loss": "l1"}},
            "steps[1].distill.output_loss: must be one of auto, kd",
        ),
        (
            {"student": {"layers_every": 2}, "train": {"epochs": 0}},
            "steps[1].train.epochs: must be a positive",
        ),
        (
            {"student": {"layers_every": 2}, "distill": {"attention_weight": 1.0, "cache": True}},
            "steps[1].distill.cache: attention maps are not cached",
        ),
    ],
)
def test_bad_distill_steps_are_named(tmp_path, capsys, distill, expected):
    assert main(["validate", str(_recipe(tmp_path, distill))]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


def test_unmatched_student_fails_before_training(tmp_path, capsys):
    # Validation passes (the sizes are only known from the data); the step stops on the first batch.
    path = _recipe(tmp_path, {"student": {"builtin": "mlp", "kwargs": {"num_classes": 3}}})
    assert main(["run", str(path), "--quiet"]) == 2
    assert "student: has 3 classes but the teacher has 10" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
