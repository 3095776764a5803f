"""The conformance table: every technique method is a row, and every row passes the same checks.

For each row, on each of the tiny models it applies to:

* the verb runs, and the model's output stays within the row's stated error
  bound of the float model (relative L2 error of the main output: logits, hidden
  states); the models are an MLP, a CNN with BatchNorm, a tiny BERT and a tiny
  Llama (grouped-query attention), each row on those its method supports;
* save -> load into a freshly built model reproduces the outputs;
* the family's non-``_`` functions leave their input model bit-identical
  (weights, dtype, train/eval mode of every submodule);
* a bad config is refused, naming the field;
* the method's recipe step runs through the real CLI (``slimkit run``).

A method registered in a table (quantization methods, prune methods, transfer
strategies) without a row here fails ``test_every_registered_method_has_a_row``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from slimkit.batch import first_output
from slimkit.cli import main
from slimkit.errors import ConfigError
from slimkit.models import DigitsCNN
from tests.conformance_rows import ROWS, TEXT_COLUMNS, Row, bad_config_rows
from tests.conformance_rows import registered_methods as _registered

MODEL_NAMES = ("mlp", "cnn", "bert", "llama")
BERT_VOCAB = 30522  # the bundled MiniLM tokenizer's: the transfer rows tokenize real text


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    if name == "cnn":
        return DigitsCNN(width=8, dropout=0.0).eval()
    if name == "llama":  # a decoder with grouped-query attention (4 query heads share 2 KV heads)
        from transformers import LlamaForCausalLM

        from tests.llm_helpers import tiny_config

        return LlamaForCausalLM(tiny_config("llama", vocab_size=256, positions=64)).eval()
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


def example(name: str, n: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(n, 64, generator=gen)
    if name == "cnn":
        return torch.randn(n, 1, 8, 8, generator=gen)
    ids = torch.randint(1, 100, (n // 2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return first_output(out).float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def fingerprint(model: nn.Module) -> dict:
    """Everything a non-``_`` function must leave as it was."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = {name: m.training for name, m in model.named_modules()}
    return {"tensors": tensors, "modes": modes}


def same_fingerprint(a: dict, b: dict) -> bool:
    if a["modes"] != b["modes"] or a["tensors"].keys() != b["tensors"].keys():
        return False
    return all(
        x.dtype == b["tensors"][k].dtype and torch.equal(x, b["tensors"][k]) for k, x in a["tensors"].items()
    )


CASES = [(row, m) for row in ROWS for m in row.models]


@dataclass
class Applied:
    row: Row
    model_name: str
    reference: torch.Tensor
    model: nn.Module
    inputs: object


_APPLIED: dict[tuple[str, str], Applied] = {}


def applied(row: Row, model_name: str) -> Applied:
    """Run the row's verb once per (row, model) and share the result among the checks."""
    key = (row.id, model_name)
    if key not in _APPLIED:
        model, inputs = build(model_name), example(model_name)
        reference = output(model, inputs)
        result = row.apply(model, model_name, example)
        _APPLIED[key] = Applied(row, model_name, reference, result, inputs)
    return _APPLIED[key]


@pytest.mark.parametrize(("row", "model_name"), CASES, ids=[f"{r.id}-{m}" for r, m in CASES])
def test_verb_runs_within_its_error_bound(row: Row, model_name: str):
    got = applied(row, model_name)
    out = output(got.model, got.inputs)
    assert torch.isfinite(out).all()
    if row.bound is not None:
        err = relative_error(out, got.reference)
        assert err <= row.bound, f"{row.id} on {model_name}: relative error {err:.4f} > bound {row.bound}"
        assert row.changes_model is False or err > 0 or row.id.startswith("distill"), (
            "the verb changed nothing"
        )


@pytest.mark.parametrize(("row", "model_name"), CASES, ids=[f"{r.id}-{m}" for r, m in CASES])
def test_save_then_load_reproduces_outputs(row: Row, model_name: str, tmp_path: Path):
    got = applied(row, model_name)
    path = tmp_path / "model.safetensors"
    before = fingerprint(got.model)
    size = row.save(got.model, path)
    assert size == path.stat().st_size > 0
    assert same_fingerprint(before, fingerprint(got.model)), "saving changed the model"
    fresh = row.load(build(model_name, seed=7), path, model_name)
    torch.testing.assert_close(output(fresh, got.inputs), output(got.model, got.inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("row", "model_name"), CASES, ids=[f"{r.id}-{m}" for r, m in CASES])
def test_non_inplace_functions_leave_the_model_as_it_was(row: Row, model_name: str):
    model = build(model_name)
    model.train()
    model.get_submodule(next(n for n, _ in model.named_modules() if n)).eval()  # mixed modes on purpose
    before = fingerprint(model)
    for pure in row.pure:
        pure(model, example(model_name))
        assert same_fingerprint(before, fingerprint(model)), f"{row.id}: {pure.__name__} changed its input"


@pytest.mark.parametrize(
    ("row_id", "make", "field"), bad_config_rows(), ids=[r[0] for r in bad_config_rows()]
)
def test_bad_config_is_refused_naming_the_field(row_id: str, make: Callable, field: str):
    with pytest.raises(ConfigError) as err:
        make()
    assert field in str(err.value), f"{row_id}: {err.value}"


def _digits_recipe(tmp_path: Path, step: dict) -> Path:
    recipe = {
        "name": "conformance",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "train": {"epochs": 2, "lr": 0.01, "progress": False}}, step],
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 16},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _text_recipe(tmp_path: Path, step: dict, folder: Path) -> Path:
    rows = [("good great nice", 1), ("bad awful poor", 0)] * 24
    csv = tmp_path / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{t} {i},{y}\n" for i, (t, y) in enumerate(rows)))
    recipe = {
        "name": "conformance",
        "model": {"hf": str(folder)},
        "data": {"name": "table", "path": str(csv), "columns": TEXT_COLUMNS},
        "steps": [_with_csv(step, str(csv))],
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 8, "max_length": 16},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _with_csv(value, csv: str):
    """The step with every ``"{csv}"`` placeholder replaced by the toy CSV's path."""
    if isinstance(value, dict):
        return {k: _with_csv(v, csv) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_csv(v, csv) for v in value]
    return csv if value == "{csv}" else value


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    from tests.transfer_helpers import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_recipe_step_round_trips_through_the_cli(row: Row, tmp_path: Path, request, capsys):
    if row.text_step:
        path = _text_recipe(tmp_path, row.step, request.getfixturevalue("tiny_bert_folder"))
    else:
        path = _digits_recipe(tmp_path, row.step)
    assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    last = report["rows"][-1]
    assert last["step"] == row.step["type"] and last["size_bytes"] > 0
    metric = next(iter(last["metrics"].values()))
    assert metric == metric, "the step's metric is NaN"
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    written = _with_csv(row.step, "")
    assert {
        k: resolved["steps"][-1][k] for k in written if k in resolved["steps"][-1]
    }.keys() == written.keys()


def test_every_registered_method_has_a_row():
    covered = {(r.family, r.method) for r in ROWS}
    missing = sorted(_registered() - covered)
    assert not missing, f"methods without a conformance row: {missing}"
    assert all(r.models for r in ROWS) and all(m in MODEL_NAMES for r in ROWS for m in r.models)
