"""Loaders for the public text sets (STS-B, SST-2, Sentiment Labelled Sentences, TREC).

Each one reads its files the way that file is really written (see the data
README): STS-B is tab-separated with stray quotes, the sentiment files use CRLF
and no final newline, TREC has a Latin-1 byte.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from slimkit.data._common import (
    finite_number,
    label_map,
    resolve_dir,
    text_bundle,
    text_splits,
    three_way,
    two_way,
)
from slimkit.data.base import DataBundle, TextDataset
from slimkit.errors import DataError

SENTIMENT_FILES = {
    "amazon": "amazon_cells_labelled.txt",
    "imdb": "imdb_labelled.txt",
    "yelp": "yelp_labelled.txt",
}
TREC_LABELS = ("coarse", "fine")


def load_stsb(root: str | Path, seed: int = 0, val_fraction: float = 0.1) -> DataBundle:
    """STS Benchmark pairs: train/val from ``sts-train.csv``, test = ``sts-dev.csv``; scores 0..5."""
    folder = resolve_dir(root, "stsb", ["sts-train.csv", "sts-dev.csv"])
    train_rows = read_stsb_file(folder / "sts-train.csv")
    test = TextDataset(read_stsb_file(folder / "sts-dev.csv"))
    kept, held = two_way(len(train_rows), val_fraction, seed)
    train, val = text_splits(train_rows, [kept, held])
    info = _info(folder, seed, "sts-train -> train/val, sts-dev -> test")
    return text_bundle("stsb", "similarity", (train, val, test), info=info)


def read_stsb_file(path: Path) -> list[dict]:
    """Rows ``{"text", "text_pair", "score"}``; columns after the 7th (provenance) are ignored."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        # QUOTE_NONE: sentences contain unmatched '"' that a quoting reader would swallow.
        for lineno, cols in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not cols:
                continue  # a blank line
            if len(cols) < 7:
                raise DataError(f"{path}:{lineno}: expected 7 tab-separated columns, got {len(cols)}")
            score = _parse_float(cols[4], path, lineno)
            if not 0.0 <= score <= 5.0:
                raise DataError(f"{path}:{lineno}: score {score} outside [0, 5]")
            rows.append({"text": cols[5], "text_pair": cols[6], "score": score})
    return rows


def load_sst2(
    root: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> DataBundle:
    """GLUE SST-2 dev (872 sentences, the only labelled part here), split into train/val/test."""
    folder = resolve_dir(root, "sst2", ["dev.tsv"])
    path = folder / "dev.tsv"
    lines = _read_lines(path, "utf-8")
    if not lines or lines[0].strip().split("\t") != ["sentence", "label"]:
        raise DataError(f"{path}:1: expected the header 'sentence<TAB>label'")
    rows = [_sentence_label(line, path, i) for i, line in enumerate(lines[1:], 2) if line.strip()]
    splits = text_splits(rows, three_way(len(rows), val_fraction, test_fraction, seed))
    info = _info(folder, seed, _split_text(path, val_fraction, test_fraction))
    return text_bundle("sst2", "classification", splits, ["negative", "positive"], info)


def load_sentiment(
    root: str | Path,
    domain: str = "yelp",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataBundle:
    """One domain of the UCI Sentiment Labelled Sentences (1000 sentences, 500 positive)."""
    if domain not in SENTIMENT_FILES:
        raise DataError(f"domain must be one of {', '.join(SENTIMENT_FILES)}; got {domain!r}")
    folder = resolve_dir(root, "sentiment_labelled_sentences", [SENTIMENT_FILES[domain]])
    path = folder / SENTIMENT_FILES[domain]
    rows = [
        _sentence_label(line, path, i) for i, line in enumerate(_read_lines(path, "utf-8"), 1) if line.strip()
    ]
    splits = text_splits(rows, three_way(len(rows), val_fraction, test_fraction, seed))
    info = _info(folder, seed, _split_text(path, val_fraction, test_fraction)) | {"domain": domain}
    return text_bundle(f"sentiment-{domain}", "classification", splits, ["negative", "positive"], info)


def load_trec(
    root: str | Path, label: str = "coarse", seed: int = 0, val_fraction: float = 0.1
) -> DataBundle:
    """TREC questions: train/val from ``train_5500.label``, test = ``TREC_10.label``.

    ``label="coarse"`` gives 6 classes (``"HUM"``); ``"fine"`` gives 50 (``"HUM:ind"``,
    kept whole because fine names like ``other`` recur under several coarse ones).
    """
    if label not in TREC_LABELS:
        raise DataError(f"label must be one of {', '.join(TREC_LABELS)}; got {label!r}")
    folder = resolve_dir(root, "trec", ["train_5500.label", "TREC_10.label"])
    train_raw = _read_trec(folder / "train_5500.label", label)
    test_raw = _read_trec(folder / "TREC_10.label", label)
    names = label_map([y for _, y in train_raw + test_raw])
    index = {n: i for i, n in enumerate(names)}
    train_rows = [_row(text, index[y]) for text, y in train_raw]
    test = TextDataset([_row(text, index[y]) for text, y in test_raw])
    train, val = text_splits(train_rows, two_way(len(train_rows), val_fraction, seed))
    info = _info(folder, seed, "train_5500 -> train/val, TREC_10 -> test") | {"label": label}
    return text_bundle(f"trec-{label}", "classification", (train, val, test), names, info)


def _read_trec(path: Path, label: str) -> list[tuple[str, str]]:
    out = []
    # train_5500.label holds one Latin-1 byte; Latin-1 decodes any byte, ASCII lines are unchanged.
    for lineno, line in enumerate(_read_lines(path, "latin-1"), 1):
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        coarse, colon, fine = tag.partition(":")
        if not colon or not coarse or not fine or not text.strip():
            raise DataError(f"{path}:{lineno}: expected 'COARSE:fine question', got {line[:60]!r}")
        out.append((text.strip(), coarse if label == "coarse" else tag))
    return out


def _read_lines(path: Path, encoding: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid {encoding} text ({err})") from None
    # Split on real line ends only: str.splitlines would also cut at form feeds and the like.
    return re.split(r"\r?\n", text)


def _sentence_label(line: str, path: Path, lineno: int) -> dict:
    text, tab, label = line.rstrip("\r\n").rpartition("\t")
    if not tab or label.strip() not in ("0", "1"):
        raise DataError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
    return _row(text.strip(), int(label))


def _row(text: str, label: int) -> dict:
    return {"text": text, "text_pair": None, "label": label}


def _parse_float(value: str, path: Path, lineno: int) -> float:
    return finite_number(value, f"{path}:{lineno}", "score")


def _split_text(path: Path, val_fraction: float, test_fraction: float) -> str:
    train = 1 - val_fraction - test_fraction
    return f"{path.name} split train/val/test {train:g}/{val_fraction:g}/{test_fraction:g}"


def _info(folder: Path, seed: int, split: str) -> dict:
    return {"folder": str(folder), "seed": seed, "split": split}
