"""``DataConfig`` (the ``data:`` section of a recipe) and ``load_data`` that dispatches on its name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimkit.config import from_dict, in_range, one_of, positive_int, require
from slimkit.data._common import resolve_dir
from slimkit.data.base import DataBundle
from slimkit.data.digits import load_digits
from slimkit.data.files import FORMATS, ROLES, load_hf_dataset, load_image_folder, load_npz, load_table
from slimkit.data.lm import (
    DEFAULT_SEQ_LEN,
    SHAKESPEARE_FILE,
    TEXT_FORMATS,
    WIKITEXT2_FILE,
    load_text,
    load_tinyshakespeare,
    load_wikitext2,
)
from slimkit.data.mnist import IMAGES, LABELS, load_mnist
from slimkit.data.text import SENTIMENT_FILES, TREC_LABELS, load_sentiment, load_sst2, load_stsb, load_trec
from slimkit.errors import DataError

SPLIT = {"val_fraction", "test_fraction"}
# Which optional fields each data set reads; setting another one is a recipe mistake.
OPTIONS: dict[str, set[str]] = {
    "digits": SPLIT,
    "mnist": {"n_train", "val_fraction"},
    "stsb": {"val_fraction"},
    "sst2": SPLIT,
    "sentiment": SPLIT | {"domain"},
    "trec": {"label", "val_fraction"},
    "table": SPLIT
    | {"columns", "format", "test_path", "val_path", "task", "header", "limit", "label_names", "join"},
    "npz": SPLIT | {"x_key", "y_key"},
    "image_folder": SPLIT | {"size", "grayscale"},
    "hf_dataset": SPLIT | {"columns", "task", "limit", "label_names", "join"},
    # language modelling: contiguous parts of one text, cut into token windows of seq_len
    "text": SPLIT | {"columns", "format", "seq_len", "stride"},
    "wikitext2": {"val_fraction", "seq_len", "stride"},  # test is always the last 20%
    "tinyshakespeare": SPLIT | {"seq_len", "stride"},
}
LOADERS: dict[str, Callable[..., DataBundle]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "stsb": load_stsb,
    "sst2": load_sst2,
    "sentiment": load_sentiment,
    "trec": load_trec,
    "table": load_table,
    "npz": load_npz,
    "image_folder": load_image_folder,
    "hf_dataset": load_hf_dataset,
    "text": load_text,
    "wikitext2": load_wikitext2,
    "tinyshakespeare": load_tinyshakespeare,
}
FILE_PATHS = {"table", "npz", "text"}  # the others take a folder
# The files each public set needs, as (usual subfolder, names): checked up front to name the field.
DATA_FILES: dict[str, Callable[[Any], tuple[str, list[str]]]] = {
    "mnist": lambda c: ("mnist", [IMAGES, LABELS]),
    "stsb": lambda c: ("stsb", ["sts-train.csv", "sts-dev.csv"]),
    "sst2": lambda c: ("sst2", ["dev.tsv"]),
    "sentiment": lambda c: ("sentiment_labelled_sentences", [SENTIMENT_FILES[c.domain or "yelp"]]),
    "trec": lambda c: ("trec", ["train_5500.label", "TREC_10.label"]),
    "wikitext2": lambda c: ("wikitext2", [WIKITEXT2_FILE]),
    "tinyshakespeare": lambda c: ("tinyshakespeare", [SHAKESPEARE_FILE]),
}
TASKS = ("classification", "regression", "similarity")


@dataclass
class DataConfig:
    """Which data set to load and how to split it; unset options keep the loader's defaults."""

    name: str
    path: str | None = None
    seed: int = 0
    val_fraction: float | None = None
    test_fraction: float | None = None
    n_train: int | None = None
    domain: str | None = None
    label: str | None = None
    # role -> column name; a 0-based position with header: false; columns.text may list several
    columns: dict[str, str | int | list] | None = None
    format: str | None = None
    header: bool | None = None  # table CSV/TSV: false when the first line is data (columns by position)
    limit: int | None = None  # read only the first N rows of each file (before splitting)
    label_names: list[str] | str | None = None  # class names (class 0 first), or a file with one per line
    join: str | None = None  # between the columns listed in columns.text (default ". ")
    test_path: str | None = None
    val_path: str | None = None
    task: str | None = None
    x_key: str | None = None
    y_key: str | None = None
    size: int | list[int] | None = None
    grayscale: bool | None = None
    seq_len: int | None = None  # language modelling: tokens per window
    stride: int | None = None  # language modelling: evaluation windows slide by this (default seq_len)

    def __post_init__(self):
        one_of(self.name, "name", LOADERS)
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an integer")
        if self.name == "digits":
            require(self.path is None, "path", "digits is built in and takes no path")
        else:
            require(isinstance(self.path, str) and self.path != "", "path", f"is required for {self.name}")
        for field in sorted(_OPTION_FIELDS - OPTIONS[self.name]):
            require(getattr(self, field) is None, field, f"is not used by {self.name}")
        self._check_values()

    def _check_values(self) -> None:
        for field in ("val_fraction", "test_fraction"):
            if getattr(self, field) is not None:
                in_range(getattr(self, field), field, 0.0, 1.0, hi_open=True)
        total = (self.val_fraction or 0) + (self.test_fraction or 0)
        require(total < 1, "test_fraction", f"val_fraction + test_fraction must be < 1, got {total}")
        _optional(positive_int, self.n_train, "n_train")
        _optional(one_of, self.domain, "domain", SENTIMENT_FILES)
        _optional(one_of, self.label, "label", TREC_LABELS)
        formats = TEXT_FORMATS if self.name == "text" else sorted(set(FORMATS.values()))
        _optional(one_of, self.format, "format", formats)
        if self.seq_len is not None:
            require(_is_int(self.seq_len) and self.seq_len >= 2, "seq_len", "must be an integer >= 2")
        if self.stride is not None:
            seq_len = self.seq_len or DEFAULT_SEQ_LEN
            require(
                _is_int(self.stride) and 1 <= self.stride <= seq_len,
                "stride",
                f"must be in [1, seq_len={seq_len}]",
            )
        _optional(one_of, self.task, "task", TASKS)
        self._check_table()
        if self.size is not None:
            sizes = [self.size] if isinstance(self.size, int) else list(self.size)
            require(len(sizes) in (1, 2), "size", "must be an integer or [height, width]")
            for i, s in enumerate(sizes):
                positive_int(s, f"size[{i}]" if isinstance(self.size, list) else "size")

    def _check_table(self) -> None:
        """``columns`` (names, or positions without a header), ``header``, ``limit``, ``label_names``, ``join``."""
        if self.header is not None:
            require(isinstance(self.header, bool), "header", "must be true or false")
            suffix = Path(self.path or "").suffix.lower().lstrip(".")
            require(
                (self.format or suffix) != "jsonl",
                "header",
                "is for CSV/TSV files (JSONL rows name their fields)",
            )
        positional = self.header is False
        if positional:
            require(
                self.columns is not None,
                "columns",
                "header: false needs columns by position, e.g. {label: 0, text: 1}",
            )
        what = "a 0-based column position (header: false)" if positional else "a column name"
        for role, column in (self.columns or {}).items():
            one_of(role, f"columns.{role}", ROLES)
            field = f"columns.{role}"
            if isinstance(column, list):
                require(role == "text", field, "must be one column (only columns.text may list several)")
                require(len(column) >= 2, field, "lists the columns to join: give two or more")
                for i, col in enumerate(column):
                    _column(col, f"{field}[{i}]", positional, what)
            else:
                _column(column, field, positional, what)
        if self.join is not None:
            require(isinstance(self.join, str), "join", "must be a string (the separator)")
            joined = isinstance((self.columns or {}).get("text"), list)
            require(joined, "join", "is used only when columns.text lists several columns")
        _optional(positive_int, self.limit, "limit")
        names = self.label_names
        if names is not None:
            usage = "must be a list of class names or a file path"
            require(isinstance(names, (str, list)) and len(names) >= 1, "label_names", usage)
            if isinstance(names, list):
                ok = all(
                    isinstance(n, (str, int)) and not isinstance(n, bool) and str(n) != "" for n in names
                )
                require(ok, "label_names", "names must be non-empty strings")
                require(len(set(map(str, names))) == len(names), "label_names", "names must be distinct")


def _column(col: Any, field: str, positional: bool, what: str) -> None:
    if positional:
        require(_is_int(col) and col >= 0, field, f"must be {what}")
    else:
        require(isinstance(col, str) and col != "", field, f"must be {what}")


def read_label_names(
    names: list | str, base_dir: str | Path | None, field: str = "data.label_names"
) -> list[str]:
    """Class names from the recipe's list, or from a file holding one name per line (blank lines skipped)."""
    if not isinstance(names, str):
        return [str(n) for n in names]
    path = check_path(names, base_dir, field, is_file=True)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{field}: {path}: cannot read ({err})") from None
    found = [line for line in lines if line]
    if not found:
        raise DataError(f"{field}: {path}: no class names (expected one per line)")
    if len(set(found)) != len(found):
        raise DataError(f"{field}: {path}: class names must be distinct")
    return found


_OPTION_FIELDS = set().union(*OPTIONS.values())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check: Callable, value: Any, field: str, *args) -> None:
    if value is not None:
        check(value, field, *args)


def load_data(
    config: DataConfig | dict, base_dir: str | Path | None = None, prefix: str = "data"
) -> DataBundle:
    """Load the data set ``config`` names.

    Relative paths are taken from ``base_dir`` (e.g. the recipe's folder) when given. Paths are
    checked before any loading and a missing one is reported with its field, such as
    ``data.path: file not found: train.csv``.
    """
    if not isinstance(config, DataConfig):
        config = from_dict(DataConfig, config, prefix)
    kwargs: dict[str, Any] = {"seed": config.seed}
    for field in sorted(OPTIONS[config.name]):
        value = getattr(config, field)
        if value is not None:
            kwargs[field] = tuple(value) if field == "size" and isinstance(value, list) else value
    for field in ("test_path", "val_path"):
        if field in kwargs:
            kwargs[field] = check_path(kwargs[field], base_dir, f"{prefix}.{field}", is_file=True)
    if "label_names" in kwargs:
        kwargs["label_names"] = read_label_names(kwargs["label_names"], base_dir, f"{prefix}.label_names")
    if config.path is None:
        return LOADERS[config.name](**kwargs)
    path = check_path(config.path, base_dir, f"{prefix}.path", config.name in FILE_PATHS)
    if config.name in DATA_FILES:
        subdir, names = DATA_FILES[config.name](config)
        try:
            path = resolve_dir(path, subdir, names)
        except DataError as err:
            raise DataError(f"{prefix}.path: {err}") from None
    return LOADERS[config.name](path, **kwargs)


def path_problem(full: Path, is_file: bool) -> str | None:
    """What is wrong with an input path (``file not found: ...``), or None if it exists."""
    if is_file and not full.is_file():
        return f"file not found: {full}"
    if not is_file and not full.is_dir():
        return f"folder not found: {full}"
    return None


def check_path(path: str | Path, base_dir: str | Path | None, field: str, is_file: bool) -> Path:
    """``path`` (relative to ``base_dir`` when given) if it exists, else a DataError naming ``field``."""
    full = Path(path).expanduser()
    if base_dir is not None and not full.is_absolute():
        full = Path(base_dir) / full
    problem = path_problem(full, is_file)
    if problem:
        raise DataError(f"{field}: {problem}")
    return full
