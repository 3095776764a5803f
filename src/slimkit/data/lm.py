"""Text for language modelling: WikiText-2, Tiny Shakespeare or the user's own ``.txt``/``.jsonl``.

A corpus is read as one text and cut into *contiguous* parts, never shuffled:
train = the start, val = what follows, test = the end. The cuts fall on line
starts, so no line is split between two parts. WikiText-2's test part is always
its last 20% (``WIKITEXT2_TEST_FRACTION``): that part is held back for perplexity,
so nothing trains or calibrates on it.

The parts stay raw text (:class:`TextStream`) until the model's tokenizer is
known; :func:`token_windows` then tokenizes a part once and cuts it into windows
of ``seq_len`` tokens (:class:`TokenWindows`), the batches of training,
calibration and evaluation alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import Dataset

from slimkit.data._common import require_file, resolve_dir
from slimkit.data.base import DataBundle
from slimkit.errors import DataError, ModelError
from slimkit.models.causal_lm import check_causal_lm

IGNORE_INDEX = -100  # a label position that is not scored (the cross-entropy's ignore_index)
TEXT_FORMATS = ("txt", "jsonl")
WIKITEXT2_FILE = "valid.txt"
WIKITEXT2_TEST_FRACTION = 0.2
SHAKESPEARE_FILE = "input.txt"
DEFAULT_SEQ_LEN = 1024
LM_TASK = "language_modeling"


class TextStream(Dataset):
    """A contiguous piece of a corpus, not yet tokenized; its length is its number of characters.

    It has no items: :func:`token_windows` turns it into a :class:`TokenWindows` once the
    model's tokenizer is known.
    """

    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source  # where it came from, for error messages ("valid.txt, last 20%")

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int):
        raise TypeError(
            f"{self.source}: text is not tokenized yet; cut it with slimkit.data.lm.token_windows"
        )


class TokenWindows(Dataset):
    """Windows of ``seq_len`` tokens from one token stream; item ``i`` is a dict of tensors.

    ``input_ids`` is the window; ``labels`` is the same ids with :data:`IGNORE_INDEX` on the
    positions that are context only. With ``stride == seq_len`` (the default) windows do not
    overlap and every token but each window's first is scored. With a smaller ``stride`` the
    windows slide by ``stride`` tokens and each one after the first scores only its last
    ``stride`` tokens, with ``seq_len - stride`` tokens of context before them. A tail shorter
    than a window is dropped, as in the GPTQ papers' protocol.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, stride: int | None = None, source: str = "text"):
        stride = seq_len if stride is None else stride
        if not 1 <= stride <= seq_len:
            raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
        self.ids = ids.reshape(-1).long()
        self.seq_len, self.stride, self.source = seq_len, stride, source
        n = self.ids.numel()
        self.starts = list(range(0, n - seq_len + 1, stride)) if n >= seq_len else []

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = self.starts[i]
        window = self.ids[start : start + self.seq_len]
        labels = window.clone()
        if i > 0 and self.stride < self.seq_len:
            labels[: self.seq_len - self.stride] = IGNORE_INDEX  # scored by an earlier window
        return {"input_ids": window, "labels": labels}

    @property
    def scored_tokens(self) -> int:
        """How many tokens evaluation predicts: seq_len - 1 in the first window, then per window
        seq_len - 1 (non-overlapping) or stride (sliding)."""
        if not self.starts:
            return 0
        per_window = self.seq_len - 1 if self.stride == self.seq_len else self.stride
        return self.seq_len - 1 + (len(self.starts) - 1) * per_window


def contiguous_parts(text: str, val_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """(train, val, test): the text cut at fractions of its length, each cut moved to the next line start."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction {val_fraction} and test_fraction {test_fraction} do not split a text")
    test_at = _line_start(text, round((1 - test_fraction) * len(text)))
    val_at = (
        _line_start(text, round((1 - test_fraction - val_fraction) * len(text))) if val_fraction else test_at
    )
    val_at = min(val_at, test_at)
    return text[:val_at], text[val_at:test_at], text[test_at:]


def _line_start(text: str, at: int) -> int:
    """The first line start at or after ``at`` (``at`` itself in a text without a line break after it)."""
    if at <= 0 or text[at - 1] == "\n":
        return max(at, 0)
    nl = text.find("\n", at)
    return nl + 1 if nl != -1 else at


def read_text(path: Path, format: str | None = None, columns: Mapping[str, str] | None = None) -> str:
    """The text of a ``.txt`` file (as it is) or of a ``.jsonl`` file (each line's text field, one per paragraph)."""
    path = require_file(path, "text file")
    fmt = format or ("jsonl" if path.suffix == ".jsonl" else "txt")
    if fmt not in TEXT_FORMATS:
        raise DataError(f"{path}: format must be one of {', '.join(TEXT_FORMATS)}, got {fmt!r}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if fmt == "txt":
        return raw
    key = (columns or {}).get("text", "text")
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise DataError(f"{path}:{lineno}: no string field {key!r} (set data.columns.text)")
        docs.append(row[key])
    return "\n\n".join(docs)


def text_corpus(
    name: str,
    text: str,
    source: str,
    val_fraction: float,
    test_fraction: float,
    seq_len: int,
    stride: int | None,
) -> DataBundle:
    """A language-modelling DataBundle of contiguous raw-text parts (tokenized later)."""
    if not text.strip():
        raise DataError(f"{source}: the text is empty")
    parts = contiguous_parts(text, val_fraction, test_fraction)
    pct = (round(100 * (1 - test_fraction - val_fraction)), round(100 * (1 - test_fraction)))
    labels = (f"first {pct[0]}%", f"{pct[0]}-{pct[1]}%", f"last {100 - pct[1]}%")
    train, val, test = (TextStream(t, f"{source} ({label})") for t, label in zip(parts, labels))
    info = {
        "file": source,
        "split": "contiguous: train, then val, then test at the end (cuts at line starts)",
        "chars": {"train": len(train), "val": len(val), "test": len(test)},
        "seq_len": seq_len,
        "stride": stride or seq_len,
    }
    return DataBundle(name, LM_TASK, train, test, val if len(val) else None, input_kind="text", info=info)


def load_text(
    path: str | Path,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
) -> DataBundle:
    """The user's own text (``.txt``, or ``.jsonl`` with a ``text`` field) for language modelling.

    ``seed`` is accepted for a uniform loader signature; contiguous splits do not shuffle.
    """
    path = Path(path)
    text = read_text(path, format, columns)
    return text_corpus(path.stem, text, str(path), val_fraction, test_fraction, seq_len, stride)


def load_wikitext2(
    root: str | Path, seed: int = 0, val_fraction: float = 0.1, seq_len: int = DEFAULT_SEQ_LEN, stride=None
) -> DataBundle:
    """WikiText-2 validation (the tokenized release): test = its last 20%, train/val from the first 80%."""
    file = resolve_dir(root, "wikitext2", [WIKITEXT2_FILE]) / WIKITEXT2_FILE
    text = read_text(file)
    return text_corpus("wikitext2", text, str(file), val_fraction, WIKITEXT2_TEST_FRACTION, seq_len, stride)


def load_tinyshakespeare(
    root: str | Path,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
) -> DataBundle:
    """Tiny Shakespeare: the usual 90/10 cut (test = the last 10%), val taken from the end of the 90%."""
    file = resolve_dir(root, "tinyshakespeare", [SHAKESPEARE_FILE]) / SHAKESPEARE_FILE
    text = read_text(file)
    return text_corpus("tinyshakespeare", text, str(file), val_fraction, test_fraction, seq_len, stride)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one stream, without special tokens (no BOS/EOS inside the stream)."""
    # verbose=False: the text is far longer than the model's window on purpose; windows are cut after.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def token_windows(
    stream: TextStream, tokenizer, seq_len: int, stride: int | None = None, split: str = "test"
) -> TokenWindows:
    """Tokenize a text part once and cut it into windows; a DataError when not one window fits."""
    ids = encode(tokenizer, stream.text)
    windows = TokenWindows(ids, seq_len, stride, stream.source)
    if len(windows) == 0:
        raise DataError(
            f"{stream.source}: the {split} text has {ids.numel()} tokens, fewer than one window of "
            f"data.seq_len={seq_len}; give more text or a smaller seq_len"
        )
    return windows


def tokenize_bundle(data: DataBundle, tokenizer) -> DataBundle:
    """The bundle with every text part cut into token windows (train/val non-overlapping, test with stride)."""
    seq_len, stride = data.info["seq_len"], data.info["stride"]
    train = token_windows(data.train, tokenizer, seq_len, None, "train")
    val = token_windows(data.val, tokenizer, seq_len, None, "val") if data.val is not None else None
    test = token_windows(data.test, tokenizer, seq_len, stride, "test")
    info = {
        **data.info,
        "windows": {"train": len(train), "val": len(val) if val else 0, "test": len(test)},
        "tokens": {
            "train": train.ids.numel(),
            "val": val.ids.numel() if val else 0,
            "test": test.ids.numel(),
        },
    }
    return DataBundle(data.name, data.task, train, test, val, input_kind="text", info=info)


def prepare_for_model(data: DataBundle, model, tokenizer) -> DataBundle:
    """Language-modelling text cut into the model's token windows, after checking the model can take them.

    Checked before any work: the model is a causal LM (ModelError), ``seq_len`` fits its positions
    (ConfigError on ``data.seq_len``) and every part holds at least one window (DataError naming the
    file). Other data sets come back unchanged.
    """
    if data.task != LM_TASK or not isinstance(data.test, TextStream):
        return data
    check_causal_lm(model, data.info["seq_len"])
    if tokenizer is None:
        raise ModelError("model: language-modelling data needs the model's tokenizer (a Hugging Face model)")
    return tokenize_bundle(data, tokenizer)
