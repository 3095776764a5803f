"""The ``prune`` recipe step through the real CLI: numbers in the report, real files."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from slimkit.cli import main
from slimkit.metrics import count_nonzero, count_parameters
from slimkit.models import DigitsCNN
from slimkit.prune import load_pruned, load_sparse


def _run(tmp_path, steps):
    recipe = {
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "train": {"epochs": 3, "lr": 0.01, "progress": False}}, *steps],
        "measure": {"repeats": 3, "warmup": 1, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet"]) == 0
    return tmp_path / "run", json.loads((tmp_path / "run" / "report.json").read_text())["rows"]


def test_structured_step_shrinks_and_reloads(tmp_path):
    run, rows = _run(
        tmp_path,
        [
            {
                "type": "prune",
                "structured": {"ratio": 0.5, "importance": "l1"},
                "train": {"epochs": 1, "lr": 0.003, "progress": False},
            }
        ],
    )
    base, pruned = rows
    assert pruned["params"] < 0.45 * base["params"]
    assert pruned["macs"] < 0.45 * base["macs"]
    assert pruned["metrics"]["accuracy"] > 0.8
    assert pruned["size_bytes"] == os.path.getsize(run / "model.safetensors")
    model = load_pruned(DigitsCNN(width=8), run / "model.safetensors")
    assert count_parameters(model) == pruned["params"]


def test_gradual_step_reaches_sparsity_and_file_shrinks(tmp_path):
    run, rows = _run(
        tmp_path,
        [
            {
                "type": "prune",
                "name": "sparse",
                "gradual": {"final_sparsity": 0.8, "end_step": 30, "frequency": 5},
                "train": {"epochs": 2, "lr": 0.003, "progress": False},
            }
        ],
    )
    base, sparse = rows
    assert sparse["extra"]["sparsity"] == pytest.approx(0.8, abs=0.005)
    assert sparse["nonzero"] < 0.35 * base["nonzero"]
    assert sparse["size_bytes"] < 0.5 * base["size_bytes"]
    model = load_sparse(DigitsCNN(width=8), run / "model.safetensors")
    assert count_nonzero(model) == sparse["nonzero"]


def test_prune_step_needs_exactly_one_method(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"builtin": "digits_cnn"},
                "data": {"name": "digits"},
                "steps": [{"type": "prune", "magnitude": {"sparsity": 0.5}, "structured": {"ratio": 0.5}}],
                "output": str(tmp_path / "o"),
            }
        )
    )
    assert main(["validate", str(path)]) == 2
    assert "steps[0].structured: give exactly one of" in capsys.readouterr().err
    path.write_text(path.read_text().replace("sparsity: 0.5", "sparsity: 1.5"))
    assert main(["validate", str(path)]) == 2
    assert "steps[0].magnitude.sparsity" in capsys.readouterr().err
    raw = yaml.safe_load(path.read_text())
    raw["steps"] = [{"type": "prune", "gradual": {"final_sparsity": 0.5, "end_step": 10}}]
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert "steps[0].train: gradual pruning happens while training" in capsys.readouterr().err
