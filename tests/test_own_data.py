"""Bring-your-own text data (issue 17): headerless files, joined and paired text, row caps,
class names, validate checking the columns, the logged learning rate, ORT peak memory."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from slimkit.cli import main
from slimkit.data.registry import load_data
from slimkit.errors import DataError

NEWS = [(3, "Wall St. bears", "Short sellers are back"), (4, "New chip", "A faster CPU ships")]
NEWS += [(1, "Peace talks", "Leaders meet again"), (2, "Late goal", "The home team wins")]


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    from tests.transfer_helpers import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _news(folder: Path, n: int = 40, header: bool = False, sep: str = ",", suffix: str = "csv") -> Path:
    """An AG-News-like file: class 1..4, title, description (optionally under a header line)."""
    lines = ["class,title,description".replace(",", sep)] if header else []
    for i in range(n):
        label, title, text = NEWS[i % 4]
        lines.append(sep.join([str(label), f"{title} {i}", text]))
    path = folder / f"news.{suffix}"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write(folder: Path, raw: dict) -> Path:
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _validate(capsys, folder: Path, data: dict) -> tuple[int, str]:
    raw = {"name": "v", "model": {"hf": "minilm", "hf_task": "classification", "num_labels": 4}, "data": data}
    raw.update(steps=[{"type": "train", "train": {"epochs": 1}}], output=str(folder / "run"))
    code = main(["validate", str(_write(folder, raw))])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err


# -- 1. headerless files ------------------------------------------------------------------------


@pytest.mark.parametrize("sep,suffix", [(",", "csv"), ("\t", "tsv")])
def test_headerless_file_reads_columns_by_position(tmp_path, sep, suffix):
    path = _news(tmp_path, sep=sep, suffix=suffix)
    b = load_data({"name": "table", "path": str(path), "header": False, "columns": {"label": 0, "text": 2}})
    assert b.num_classes == 4 and sum(b.info["sizes"].values()) == 40
    row = b.train.rows[0]
    assert row["text"] in {t for _, _, t in NEWS} and row["label"] in range(4)
    # 1-based labels renumbered, and said so
    assert any("renumbered" in n and "1->0" in n for n in b.info["notes"])


def test_validate_checks_positions_and_names_exist(tmp_path, capsys):
    path = str(_news(tmp_path))
    ok = {"name": "table", "path": path, "header": False, "columns": {"label": 0, "text": 2}}
    assert _validate(capsys, tmp_path, ok)[0] == 0
    code, err = _validate(capsys, tmp_path, {**ok, "columns": {"label": 0, "text": 5}})
    assert code == 2 and "data.columns.text" in err and "positions 0..2" in err
    code, err = _validate(capsys, tmp_path, {**ok, "columns": {"label": 0, "text": "title"}})
    assert code == 2 and "data.columns.text" in err and "position" in err
    code, err = _validate(capsys, tmp_path, {k: v for k, v in ok.items() if k != "columns"})
    assert code == 2 and "data.columns" in err
    # with a header: a column name the file does not have is refused, naming what it has
    named = str(_news(tmp_path, header=True))
    good = {"name": "table", "path": named, "columns": {"label": "class", "text": "description"}}
    assert _validate(capsys, tmp_path, good)[0] == 0
    code, err = _validate(capsys, tmp_path, {**good, "columns": {"label": "class", "text": "body"}})
    assert code == 2 and "data.columns.text" in err and "'body'" in err and "class, title, description" in err
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": f"s {i}", "y": i % 2}) + "\n" for i in range(20)))
    code, err = _validate(
        capsys, tmp_path, {"name": "table", "path": str(jsonl), "columns": {"text": "text", "label": "y"}}
    )
    assert code == 2 and "data.columns.text" in err and "sentence" in err
    code, err = _validate(
        capsys,
        tmp_path,
        {"name": "table", "path": str(jsonl), "header": False, "columns": {"text": 0, "label": 1}},
    )
    assert code == 2 and "data.header" in err


# -- 2. two text columns ------------------------------------------------------------------------


def test_text_columns_are_joined_with_the_separator(tmp_path):
    path = _news(tmp_path, header=True)
    base = {
        "name": "table",
        "path": str(path),
        "columns": {"label": "class", "text": ["title", "description"]},
    }
    b = load_data(base)
    expected = {f"{t} {i}. {d}" for i in range(40) for _, t, d in [NEWS[i % 4]]}
    assert {r["text"] for split in (b.train, b.val, b.test) for r in split.rows} == expected
    joined = load_data({**base, "join": " | "})
    title, desc = joined.train.rows[0]["text"].split(" | ")
    assert title.rsplit(" ", 1)[1].isdigit() and desc in {d for _, _, d in NEWS}
    with pytest.raises(Exception, match="join"):
        load_data({**base, "columns": {"label": "class", "text": "title"}, "join": " "})


def test_text_pair_on_classification_is_encoded_jointly(tmp_path):
    """The pair reaches a classifier as one [CLS] a [SEP] b [SEP] input, not dropped."""
    from slimkit.tasks import build_task
    from tests.transfer_helpers import tokenizer

    path = _news(tmp_path, header=True)
    cols = {"label": "class", "text": "title", "text_pair": "description"}
    b = load_data({"name": "table", "path": str(path), "columns": cols})
    task = build_task(b, tokenizer(), max_length=32)
    batch = task.collate_fn(b.train.rows[:2])
    alone = build_task(
        load_data({"name": "table", "path": str(path), "columns": {"label": "class", "text": "title"}}),
        tokenizer(),
        32,
    )
    single = alone.collate_fn([{**r, "text_pair": None} for r in b.train.rows[:2]])
    assert "pair_input_ids" not in batch
    assert batch["input_ids"].shape[1] > single["input_ids"].shape[1]
    sep = tokenizer().sep_token_id
    assert int((batch["input_ids"][0] == sep).sum()) == 2


def test_pair_classification_recipe_runs(tmp_path, tiny_bert_folder, capsys):
    path = _news(tmp_path, header=True)
    raw = {
        "name": "pairs",
        "model": {"hf": str(tiny_bert_folder), "hf_task": "classification", "num_labels": 4},
        "data": {
            "name": "table",
            "path": str(path),
            "columns": {"label": "class", "text": "title", "text_pair": "description"},
            "label_names": ["World", "Sports", "Business", "Sci/Tech"],
        },
        "steps": [{"type": "train", "train": {"epochs": 1, "batch_size": 8, "lr": 0.001}}],
        "measure": {"repeats": 1, "warmup": 0, "batch_size": 4, "max_length": 16, "latency": False},
        "output": str(tmp_path / "run"),
    }
    assert main(["run", str(_write(tmp_path, raw)), "--quiet"]) == 0
    logs = (tmp_path / "run" / "run.log").read_text()
    assert "1->0 'World'" in logs and "4->3 'Sci/Tech'" in logs


# -- 3. row cap and class names -----------------------------------------------------------------


def test_limit_reads_the_first_rows_before_splitting(tmp_path):
    path = _news(tmp_path, n=100, header=True)
    cols = {"label": "class", "text": "title"}
    b = load_data({"name": "table", "path": str(path), "columns": cols, "limit": 20})
    rows = [r for split in (b.train, b.val, b.test) if split for r in split.rows]
    assert len(rows) == 20
    assert sorted(int(r["text"].rsplit(" ", 1)[1]) for r in rows) == list(range(20))
    again = load_data({"name": "table", "path": str(path), "columns": cols, "limit": 20})
    assert again.test.rows == b.test.rows
    with pytest.raises(Exception, match="limit"):
        load_data({"name": "table", "path": str(path), "columns": cols, "limit": 0})


def test_label_names_from_list_or_file(tmp_path, caplog):
    path = _news(tmp_path, header=True)
    cols = {"label": "class", "text": "title"}
    names = ["World", "Sports", "Business", "Sci/Tech"]
    with caplog.at_level(logging.INFO, logger="slimkit.data"):
        b = load_data({"name": "table", "path": str(path), "columns": cols, "label_names": names})
    assert b.label_names == names and b.num_classes == 4
    assert "1-based" in caplog.text and "3->2 'Business'" in caplog.text
    first = b.train.rows[0]
    assert (
        names[first["label"]] == {f"{t}": names[c - 1] for c, t, _ in NEWS}[first["text"].rsplit(" ", 1)[0]]
    )
    file = tmp_path / "classes.txt"
    file.write_text("\n".join(names) + "\n")
    assert (
        load_data({"name": "table", "path": str(path), "columns": cols, "label_names": str(file)}).label_names
        == names
    )
    with pytest.raises(DataError, match="label_names"):
        load_data({"name": "table", "path": str(path), "columns": cols, "label_names": names[:2]})
    # string labels take their place in label_names (not sorted order)
    strings = tmp_path / "s.csv"
    strings.write_text("text,label\n" + "".join(f"t {i},{['pos', 'neg'][i % 2]}\n" for i in range(20)))
    s = load_data({"name": "table", "path": str(strings), "label_names": ["pos", "neg"]})
    assert s.label_names == ["pos", "neg"] and all(
        r["label"] == int(r["text"].split()[1]) % 2 for r in s.test.rows
    )
    with pytest.raises(DataError, match="'neg' .* not among"):
        load_data({"name": "table", "path": str(strings), "label_names": ["pos", "other"]})


def test_string_labels_order_is_logged(tmp_path, caplog):
    strings = tmp_path / "s.csv"
    strings.write_text("text,label\n" + "".join(f"t {i},{['pos', 'neg'][i % 2]}\n" for i in range(20)))
    with caplog.at_level(logging.INFO, logger="slimkit.data"):
        b = load_data({"name": "table", "path": str(strings)})
    assert b.label_names == ["neg", "pos"] and "sorted order (neg->0, pos->1)" in caplog.text


def test_validate_refuses_bad_new_options(tmp_path, capsys):
    path = str(_news(tmp_path, header=True))
    base = {"name": "table", "path": path, "columns": {"label": "class", "text": "title"}}
    for bad, field in [
        ({"limit": -1}, "data.limit"),
        ({"label_names": str(tmp_path / "none.txt")}, "data.label_names"),
        ({"label_names": ["a", "a"]}, "data.label_names"),
        ({"columns": {"label": ["class", "title"], "text": "title"}}, "data.columns.label"),
        ({"header": "no"}, "data.header"),
    ]:
        code, err = _validate(capsys, tmp_path, {**base, **bad})
        assert code == 2 and field in err, (bad, err)


# -- 5. the logged learning rate ----------------------------------------------------------------


def test_epoch_metrics_show_the_base_lr_and_the_head_apart():
    from slimkit.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    groups = lambda m: [  # noqa: E731
        {"params": list(m[2].parameters()), "lr_scale": 20.0, "role": "head"},
        {"params": list(m[0].parameters()), "lr_scale": 1.0},
    ]
    cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-5, progress=False)
    trainer = Trainer(model, cfg, param_groups=groups)
    result = trainer.fit(torch.utils.data.TensorDataset(x, y))
    last = result.history[-1]
    assert last["lr"] == pytest.approx(5e-5) and last["head_lr"] == pytest.approx(1e-3)


# -- 6. ONNX Runtime peak memory ----------------------------------------------------------------


def test_ort_peak_memory_is_measured_on_a_fresh_session(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import to_onnxruntime
    from slimkit.recipes.runner import _peak_inference_memory
    from slimkit.tasks import TaskAdapter

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 4096), nn.Linear(4096, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(256, 64)
    ort = to_onnxruntime(Wide().eval(), {"x": x}, tmp_path / "m.onnx")
    ort(x=x)  # the arena is allocated now: a second call on this session grows nothing
    task = TaskAdapter("classification", lambda m, b: m(**b), lambda o, b: o)
    peak, note = _peak_inference_memory(ort, {"x": x}, task)
    assert peak > 2_000_000, peak  # the (256, 4096) float32 activation is 4 MiB
    assert "fresh session" in note["peak_inference_mem_note"]
    copy.deepcopy(ort)  # the measured session is a copy; the original still runs
    assert ort(x=x).shape == (256, 8)


def test_export_row_notes_how_its_peak_memory_was_measured(tmp_path):
    pytest.importorskip("onnxruntime")
    raw = {
        "name": "ort-mem",
        "model": {"builtin": "lenet300100", "kwargs": {"in_features": 64}},
        "data": {"name": "digits"},
        "steps": [
            {"type": "train", "train": {"epochs": 1, "lr": 0.01, "progress": False}},
            {"type": "export", "onnxruntime": {"example_samples": 4}},
        ],
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 256, "latency": False},
        "output": str(tmp_path / "run"),
    }
    assert main(["run", str(_write(tmp_path, raw)), "--quiet"]) == 0
    trained, exported = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert "fresh session" in exported["extra"]["peak_inference_mem_note"]
    assert "peak_inference_mem_note" not in trained["extra"]
    assert isinstance(exported["extra"]["peak_inference_mem_bytes"], int)
