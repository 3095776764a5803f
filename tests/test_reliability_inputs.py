"""Bad data, bad model files and NaN training through the CLI: exit code, a message naming the thing, no traceback.

Every probe writes its own recipe and files under ``tmp_path`` and runs ``slimkit run`` in-process;
exit 2 is bad input (data, weights, model folder), exit 1 a failure during the work (NaN/inf in
training). No probe may leave a run folder behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.cli import main
from slimkit.errors import NonFiniteError
from slimkit.models import DigitsCNN
from slimkit.train import Callback, TrainConfig, Trainer, guard
from slimkit.utils.io import state_dict_for_saving

FAST_TRAIN = {"epochs": 1, "lr": 0.01, "batch_size": 16, "progress": False}


def _recipe(tmp_path: Path, data: dict, model: dict | None = None, train: dict | None = None) -> Path:
    recipe = {
        "name": "probe",
        "model": model or {"builtin": "digits_cnn", "kwargs": {"width": 4}},
        "data": data,
        "steps": [{"type": "train", "train": {**FAST_TRAIN, **(train or {})}}],
        "measure": {"repeats": 1, "warmup": 0, "batch_size": 8, "latency": False},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(tmp_path: Path, capsys, recipe: Path) -> tuple[int, str]:
    code = main(["run", str(recipe), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 0 or _leftovers(tmp_path, "run") == [], f"a failed run left {_leftovers(tmp_path, 'run')}"
    return code, err


def _leftovers(folder: Path, name: str) -> list[str]:
    """A run folder or its temporary build (``.NAME.<id>.tmp``); ``.NAME.partial`` is --resume's state."""
    return [
        p.name
        for p in folder.iterdir()
        if p.name == name or p.name.startswith(f".{name}.") and p.suffix == ".tmp"
    ]


# --- data files -----------------------------------------------------------------------------------


def _images(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n)


def _npz_nan_target(d: Path) -> Path:
    x, y = _images()
    y = y.astype(np.float32)
    y[7] = np.nan
    np.savez(d / "t.npz", x=x, y=y)
    return d / "t.npz"


def _npz_inf_input(d: Path) -> Path:
    x, y = _images()
    x = x.reshape(40, 64)
    x[5, 19] = np.inf
    np.savez(d / "f.npz", x=x, y=y)
    return d / "f.npz"


def _npz_nan_pixel(d: Path) -> Path:
    x, y = _images()
    x[12, 0, 2, 3] = np.nan
    np.savez(d / "img.npz", x=x, y=y)
    return d / "img.npz"


def _npz_empty(d: Path) -> Path:
    np.savez(d / "e.npz")
    return d / "e.npz"


def _npz_zero_bytes(d: Path) -> Path:
    (d / "z.npz").write_bytes(b"")
    return d / "z.npz"


def _npz_no_samples(d: Path) -> Path:
    np.savez(d / "n.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    return d / "n.npz"


def _table(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text, encoding="utf-8")
    return d / name


def _scores(bad: str) -> str:
    rows = [f"sentence {i},{i % 5}.0" for i in range(20)]
    rows[2] = f"sentence 2,{bad}"  # line 4 of the file (after the header)
    return "text,score\n" + "\n".join(rows) + "\n"


DATA_PROBES = [
    # (id, make the file, data section extra, expected pieces of the message)
    ("npz-nan-target", _npz_nan_target, {"name": "npz"}, ["t.npz", "array 'y'", "sample 7", "nan"]),
    ("npz-inf-input", _npz_inf_input, {"name": "npz"}, ["f.npz", "array 'x'", "sample 5", "position (19,)"]),
    ("npz-nan-pixel", _npz_nan_pixel, {"name": "npz"}, ["img.npz", "array 'x'", "sample 12", "(0, 2, 3)"]),
    ("npz-empty", _npz_empty, {"name": "npz"}, ["e.npz", "empty .npz"]),
    ("npz-zero-bytes", _npz_zero_bytes, {"name": "npz"}, ["z.npz", "not a readable .npz"]),
    ("npz-no-samples", _npz_no_samples, {"name": "npz"}, ["n.npz", "no samples"]),
    (
        "csv-nan-score",
        lambda d: _table(d, "s.csv", _scores("nan")),
        {"name": "table"},
        ["s.csv:4", "column 'score'", "nan", "not a finite number"],
    ),
    (
        "csv-inf-score",
        lambda d: _table(d, "s.csv", _scores("-inf")),
        {"name": "table"},
        ["s.csv:4", "column 'score'", "-inf"],
    ),
    (
        "jsonl-nan-score",
        lambda d: _table(d, "s.jsonl", '{"text": "a", "score": 1}\n{"text": "b", "score": NaN}\n'),
        {"name": "table"},
        ["s.jsonl:2", "column 'score'", "nan"],
    ),
    (
        "jsonl-nan-label",
        lambda d: _table(d, "l.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n'),
        {"name": "table"},
        ["l.jsonl:2", "column 'label'"],
    ),
    (
        "csv-extra-column",
        lambda d: _table(d, "x.csv", "text,label\na,0\nb,1,surplus\nc,0\n"),
        {"name": "table"},
        ["x.csv:3", "3 values", "2 columns", "surplus"],
    ),
    (
        "tsv-extra-column",
        lambda d: _table(d, "x.tsv", "text\tlabel\na\t0\nb\t1\nc\t0\textra\n"),
        {"name": "table"},
        ["x.tsv:4", "header has 2 columns"],
    ),
    (
        "csv-header-only",
        lambda d: _table(d, "h.csv", "text,label\n"),
        {"name": "table"},
        ["h.csv", "no data rows"],
    ),
    ("csv-empty", lambda d: _table(d, "v.csv", ""), {"name": "table"}, ["v.csv", "empty file"]),
]


@pytest.mark.parametrize(
    "make, data, expected", [p[1:] for p in DATA_PROBES], ids=[p[0] for p in DATA_PROBES]
)
def test_bad_data_is_refused_naming_file_and_row(tmp_path, capsys, make, data, expected):
    path = make(tmp_path)
    flat = (
        path.suffix == ".npz" and path.stat().st_size and np.load(path).get("x", np.zeros((1, 1))).ndim == 2
    )
    model = {"builtin": "lenet300100"} if flat else None  # a model that takes the data's shape
    code, err = _run(tmp_path, capsys, _recipe(tmp_path, {**data, "path": str(path)}, model))
    assert code == 2, err
    for piece in expected:
        assert piece in err, (piece, err)
    assert len(err.strip().splitlines()) <= 4


def test_labels_beyond_the_heads_classes_name_label_file_and_outputs(tmp_path, capsys):
    x, _ = _images(60)
    y = np.arange(60) % 9  # labels 0..8
    np.savez(tmp_path / "nine.npz", x=x, y=y)
    model = {"builtin": "digits_cnn", "kwargs": {"width": 4, "num_classes": 5}}
    code, err = _run(
        tmp_path, capsys, _recipe(tmp_path, {"name": "npz", "path": str(tmp_path / "nine.npz")}, model)
    )
    assert code == 2, err
    assert "nine.npz: label 8 is beyond the model's 5 outputs" in err
    assert "IndexError" not in err and "out of bounds" not in err


def test_one_based_labels_are_renumbered_and_said_in_the_log(tmp_path):
    from slimkit.data import load_table

    rows = "\n".join(f"s{i},{i % 3 + 1}" for i in range(30))
    _table(tmp_path, "one.csv", "text,label\n" + rows + "\n")
    bundle = load_table(tmp_path / "one.csv")
    assert bundle.label_names == ["1", "2", "3"] and bundle.num_classes == 3
    (note,) = bundle.info["notes"]
    assert "one.csv" in note and "1->0, 2->1, 3->2" in note
    zero_based = "\n".join(f"s{i},{i % 3}" for i in range(30))
    _table(tmp_path, "zero.csv", "text,label\n" + zero_based + "\n")
    assert load_table(tmp_path / "zero.csv").info["notes"] == []


def test_stsb_still_ignores_columns_after_the_seventh_but_refuses_a_nan_score(tmp_path):
    from slimkit.data import load_stsb
    from slimkit.errors import DataError

    good = "g\tf\t2012\t1\t4.5\tA.\tB.\tprovenance\textra"
    (tmp_path / "sts-train.csv").write_text("\n".join([good] * 12) + "\n", encoding="utf-8")
    (tmp_path / "sts-dev.csv").write_text(good + "\ng\tf\t2012\t2\tnan\tA.\tB.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sts-dev\.csv:2: score is 'nan', not a finite number"):
        load_stsb(tmp_path)
    (tmp_path / "sts-dev.csv").write_text(good + "\n", encoding="utf-8")
    assert load_stsb(tmp_path, val_fraction=0.25).test[0]["text_pair"] == "B."


# --- weights files and model folders --------------------------------------------------------------


def _weights(d: Path) -> Path:
    torch.manual_seed(0)
    path = d / "w.safetensors"
    save_file(state_dict_for_saving(DigitsCNN(width=4)), str(path))
    return path


def _corrupt(d: Path) -> Path:
    (d / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    return d / "w.safetensors"


def _truncated(d: Path) -> Path:
    path = _weights(d)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _empty(d: Path) -> Path:
    (d / "w.safetensors").write_bytes(b"")
    return d / "w.safetensors"


def _int8(d: Path) -> Path:
    torch.manual_seed(0)
    state = state_dict_for_saving(DigitsCNN(width=4))
    state["features.0.weight"] = (state["features.0.weight"] * 100).to(torch.int8)
    save_file(state, str(d / "w.safetensors"))
    return d / "w.safetensors"


def _nan_weight(d: Path) -> Path:
    state = state_dict_for_saving(DigitsCNN(width=4))
    state["classifier.5.bias"][3] = float("nan")
    save_file(state, str(d / "w.safetensors"))
    return d / "w.safetensors"


WEIGHT_PROBES = [
    ("corrupt", _corrupt, ["w.safetensors", "not a readable safetensors file"]),
    ("truncated", _truncated, ["w.safetensors", "not a readable safetensors file"]),
    ("empty", _empty, ["w.safetensors", "an empty file"]),
    ("int8-into-float", _int8, ["w.safetensors", "'features.0.weight'", "int8", "float32"]),
    ("nan-weight", _nan_weight, ["w.safetensors", "'classifier.5.bias'", "NaN"]),
]


@pytest.mark.parametrize("make, expected", [p[1:] for p in WEIGHT_PROBES], ids=[p[0] for p in WEIGHT_PROBES])
def test_bad_weights_file_is_refused_naming_it(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    model = {"builtin": "digits_cnn", "kwargs": {"width": 4}, "weights": str(path)}
    code, err = _run(tmp_path, capsys, _recipe(tmp_path, {"name": "digits"}, model))
    assert code == 2, err
    for piece in expected:
        assert piece in err, (piece, err)


def test_good_weights_file_still_loads(tmp_path):
    from slimkit.utils.io import load_weights

    model = load_weights(DigitsCNN(width=4), _weights(tmp_path))
    torch.manual_seed(0)
    assert torch.equal(model.features[0].weight, DigitsCNN(width=4).features[0].weight)


def _hf_folder(d: Path, config: str | None, files: dict[str, bytes]) -> Path:
    folder = d / "hfmodel"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


BERT = json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1})
HF_PROBES = [
    (
        "corrupt-config",
        '{"model_type": "bert", ',
        {"model.safetensors": b""},
        ["config.json", "not a readable JSON"],
    ),
    ("config-not-object", "[1, 2]", {"model.safetensors": b""}, ["config.json", "expected a JSON object"]),
    ("no-weights", BERT, {}, ["hfmodel", "no weights"]),
    ("only-pytorch-bin", BERT, {"pytorch_model.bin": b"PK\x03\x04"}, ["pytorch_model.bin", "safetensors"]),
    ("no-config", None, {"model.safetensors": b""}, ["hfmodel", "no config.json"]),
]


@pytest.mark.parametrize("config, files, expected", [p[1:] for p in HF_PROBES], ids=[p[0] for p in HF_PROBES])
def test_bad_hugging_face_folder_is_refused_naming_it(tmp_path, capsys, config, files, expected):
    folder = _hf_folder(tmp_path, config, files)
    model = {"hf": str(folder), "hf_task": "classification", "num_labels": 10}
    code, err = _run(tmp_path, capsys, _recipe(tmp_path, {"name": "digits"}, model))
    assert code == 2, err
    for piece in expected:
        assert piece in err, (piece, err)


def test_hf_folder_with_corrupt_weights_is_refused_at_load(tmp_path):
    from slimkit.errors import ModelError
    from slimkit.models.hf import load_hf

    pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path, BERT, {"model.safetensors": b"\x00" * 16})
    with pytest.raises(ModelError, match="hfmodel"):
        load_hf(str(folder), "classification", num_labels=2)


# --- NaN / inf in training ------------------------------------------------------------------------


def test_huge_learning_rate_stops_with_step_epoch_and_no_run_folder(tmp_path, capsys):
    # The demo's training settings (adamw, decoupled weight decay 0.01) with lr 1e6: the weights are
    # multiplied by about -1e4 each step and overflow within a few batches.
    train = {"lr": 1e6, "epochs": 3, "batch_size": 64, "optimizer": "adamw", "weight_decay": 0.01}
    code, err = _run(tmp_path, capsys, _recipe(tmp_path, {"name": "digits"}, train=train))
    assert code == 1, err
    assert "steps[0] (train)" in err and "epoch 1/3, batch " in err
    assert "is nan" in err or "is inf" in err
    assert _leftovers(tmp_path, "run") == []


def test_demo_with_a_huge_learning_rate_fails_in_its_first_step(tmp_path, capsys):
    code = main(["demo", "--output", str(tmp_path / "demo"), "--quiet", "steps.0.train.lr=1e6"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "steps[0] (train): epoch 1/10, batch " in err
    assert _leftovers(tmp_path, "demo") == []


def _tiny_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.01, "progress": False, **kw})


def test_nan_loss_stops_at_its_batch_before_the_weights_change():
    calls = []

    def loss_fn(outputs, batch):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, batch[1])
        return loss * float("nan") if len(calls) == 3 else loss

    model = _tiny_model()
    trainer = Trainer(model, _cfg(), loss_fn=loss_fn)
    with pytest.raises(NonFiniteError, match=r"epoch 1/2, batch 3/4: the loss is nan") as info:
        trainer.fit(_tiny_data())
    assert info.value.where == "epoch 1/2, batch 3/4" and trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _PoisonGrad(Callback):
    def __init__(self, name: str, at_step: int):
        self.name, self.at_step = name, at_step

    def on_after_backward(self, trainer):
        if trainer.global_step == self.at_step:
            dict(trainer.model.named_parameters())[self.name].grad[0] = float("inf")


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_inf_gradient_names_its_layer(grad_clip):
    model = _tiny_model()
    trainer = Trainer(model, _cfg(grad_clip=grad_clip), callbacks=[_PoisonGrad("2.weight", at_step=5)])
    with pytest.raises(NonFiniteError, match=r"epoch 2/2, batch 2/4: the gradient of '2.weight' is") as info:
        trainer.fit(_tiny_data())
    assert info.value.layer == "2.weight" and trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_that_overflow_are_caught_at_the_end_of_the_epoch():
    class Overflow(Callback):
        def on_step_end(self, trainer):
            if trainer.global_step == 4:
                with torch.no_grad():
                    trainer.model[0].bias[1] = float("inf")

    trainer = Trainer(_tiny_model(), _cfg(epochs=1), callbacks=[Overflow()])
    with pytest.raises(NonFiniteError, match=r"end of epoch 1/1: the weights of '0.bias' became inf") as info:
        trainer.fit(_tiny_data())
    assert info.value.layer == "0.bias"


def test_a_finite_run_never_searches_layer_by_layer(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the per-parameter search ran on a finite step")

    monkeypatch.setattr(guard, "first_nonfinite", forbidden)
    for clip in (None, 0.5):
        result = Trainer(_tiny_model(), _cfg(grad_clip=clip)).fit(_tiny_data())
        assert result.steps == 8 and all(
            torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history
        )


def test_grad_clip_still_clips_through_the_guard():
    model = _tiny_model()
    loss = nn.functional.cross_entropy(model(_tiny_data().tensors[0]) * 1000, _tiny_data().tensors[1])
    loss.backward()
    before = float(guard.total_norm(p.grad for p in model.parameters()))
    guard.check_step(model, loss, loss, "here", grad_clip=0.5)
    after = float(guard.total_norm(p.grad for p in model.parameters()))
    assert before > 1.0 and after == pytest.approx(0.5, rel=1e-4)
