"""Bring-your-own data: tables (CSV/TSV/JSONL), NumPy ``.npz``, image folders, saved HF datasets."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from slimkit.config import short_repr
from slimkit.data._common import (
    _is_int,
    finite_number,
    label_map,
    note_label_map,
    require_dir,
    require_file,
    require_finite,
    tensor_bundle,
    text_bundle,
    text_splits,
    three_way,
    two_way,
)
from slimkit.data.base import DataBundle, TextDataset
from slimkit.errors import DataError
from slimkit.utils.quiet import hush_imported

ROLES = ("text", "text_pair", "label", "score")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
HF_SPLITS = {"train": "train", "validation": "val", "val": "val", "dev": "val", "test": "test"}

Record = tuple[str, dict]  # (location for error messages, raw row)
Column = str | int | list  # a column name, a 0-based position (no header), or several (text only)
DEFAULT_JOIN = ". "  # between the columns of columns.text: [title, description]


def load_table(
    path: str | Path,
    columns: Mapping[str, str] | None = None,
    format: str | None = None,
    test_path: str | Path | None = None,
    val_path: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    task: str | None = None,
    header: bool = True,
    limit: int | None = None,
    label_names: Sequence[str] | None = None,
    join: str = DEFAULT_JOIN,
) -> DataBundle:
    """A text DataBundle from a table file (``.csv``, ``.tsv`` or ``.jsonl``; ``format`` overrides the suffix).

    ``columns`` maps the roles ``text``, ``text_pair``, ``label``, ``score`` to column names (or,
    with ``header=False``, to 0-based column positions); by default every role whose name is a
    column is used. ``text`` may name several columns, joined with ``join``. ``limit`` reads
    only the first rows of each file (before any split). Splits missing as files are cut from
    ``path`` deterministically with ``seed``. Labels become classes as :func:`class_index` says.
    """
    files = {"train": path, "val": val_path, "test": test_path}
    sources = {split: read_table(p, format, header, limit) for split, p in files.items() if p is not None}
    bundle = bundle_from_records(
        Path(path).stem, sources, columns, seed, val_fraction, test_fraction, task, label_names, join
    )
    bundle.info["file"] = str(path)
    return bundle


def read_table(
    path: str | Path, format: str | None = None, header: bool = True, limit: int | None = None
) -> list[Record]:
    """Raw rows of one table file (at most ``limit``, the first ones), each with its ``file:line`` location.

    Without a ``header`` (CSV/TSV only) a row's keys are its 0-based column positions.
    """
    path = require_file(Path(path))
    fmt = format or FORMATS.get(path.suffix.lower())
    if fmt not in FORMATS.values():
        raise DataError(
            f"{path}: cannot tell the format from the suffix; pass format= one of csv, tsv, jsonl"
        )
    if not header and fmt == "jsonl":
        raise DataError(f"{path}: header: false is for CSV/TSV files (JSONL rows name their fields)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if fmt == "jsonl":
                rows = list(itertools.islice(iter_jsonl(f, path), limit))
            elif header:
                rows = _read_delimited(f, path, fmt, limit)
            else:
                rows = _read_headerless(f, path, fmt, limit)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err})") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def _read_delimited(f, path: Path, fmt: str, limit: int | None = None) -> list[Record]:
    reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
    try:
        rows = [(f"{path}:{reader.line_num}", row) for row in itertools.islice(reader, limit)]
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: {err}") from None
    if reader.fieldnames is None:
        raise DataError(f"{path}: empty file (expected a header line)")
    for loc, row in rows:
        if None in row:  # DictReader keeps the values beyond the header's columns under None
            extra = row[None]
            raise DataError(
                f"{loc}: {len(reader.fieldnames) + len(extra)} values but the header has "
                f"{len(reader.fieldnames)} columns (extra: {short_repr(extra)}); quote values that hold a "
                f"{'comma' if fmt == 'csv' else 'tab'}"
            )
    return rows


def _read_headerless(f, path: Path, fmt: str, limit: int | None = None) -> list[Record]:
    """Rows of a CSV/TSV without a header line: ``{0: first value, 1: second, ...}``; blank lines skipped."""
    reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
    rows: list[Record] = []
    try:
        for values in reader:
            if limit is not None and len(rows) >= limit:
                break
            if values:
                rows.append((f"{path}:{reader.line_num}", dict(enumerate(values))))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: {err}") from None
    return rows


def iter_jsonl(f, path: Path):
    """``(where, row)`` for each non-empty line of a JSONL file; each row must be a JSON object."""
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{lineno}", row


def bundle_from_records(
    name: str,
    sources: dict[str, list[Record]],
    columns: Mapping[str, str] | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    task: str | None = None,
    label_names: Sequence[str] | None = None,
    join: str = DEFAULT_JOIN,
) -> DataBundle:
    """Turn raw records of a train (and maybe val/test) source into a text DataBundle."""
    train_records = sources["train"]
    if not train_records:
        raise DataError(f"{name}: the training data has no rows")
    roles = _resolve_columns(columns, train_records[0])
    raw = {split: [_extract(rec, roles, join) for rec in recs] for split, recs in sources.items()}
    names, notes = None, []
    if "label" in roles:
        found = [r["label"] for rows in raw.values() for r in rows]
        names, index, notes = class_index(found, label_names, _source(train_records[0][0]))
        for rows in raw.values():
            for r in rows:
                r["label"] = index[r["label"]]
    elif label_names is not None:
        raise DataError("label_names: the data has no 'label' column (columns.label) to name")
    splits = _split(raw, seed, val_fraction, test_fraction)
    info = {"columns": dict(roles), "seed": seed, "notes": notes}
    return text_bundle(name, _task(task, roles), splits, names, info)


def class_index(
    found: Sequence[str], label_names: Sequence[str] | None, source: str
) -> tuple[list[str], dict[str, int], list[str]]:
    """(class names, label -> class index, notes logged) for the labels ``found`` in the data.

    Without ``label_names``: integer labels in numeric order, others in sorted order (the map is
    logged when it is not the identity). With ``label_names`` (class 0's name first): labels that
    are names take their position in the list; integer labels index it 0-based, or 1-based when
    they run 1..N (said in the log).
    """
    distinct = label_map(found)
    if label_names is None:
        return distinct, {n: i for i, n in enumerate(distinct)}, note_label_map(source, distinct)
    names = [str(n) for n in label_names]
    if len(set(names)) != len(names) or not names:
        raise DataError(f"label_names: must be distinct, non-empty class names (got {short_repr(names)})")
    if set(distinct) <= set(names):
        index = {n: names.index(n) for n in distinct}
        how = "by their position in label_names"
    elif all(_is_int(v) for v in distinct):
        values = sorted(int(v) for v in distinct)
        if values[0] >= 0 and values[-1] < len(names):
            index, how = {v: int(v) for v in distinct}, "0-based into label_names"
        elif values[0] >= 1 and values[-1] <= len(names):
            index, how = {v: int(v) - 1 for v in distinct}, "1-based: label k is class k-1 of label_names"
        else:
            raise DataError(
                f"label_names: {len(names)} names, but the labels run {values[0]}..{values[-1]} "
                f"(expected 0..{len(names) - 1} or 1..{len(names)})"
            )
    else:
        missing = [v for v in distinct if v not in names]
        raise DataError(
            f"label_names: label {missing[0]!r} in {source} is not among the names ({short_repr(names)})"
        )
    shown = ", ".join(f"{v}->{index[v]} {names[index[v]]!r}" for v in distinct[:10])
    note = f"{source}: labels mapped {how} ({shown}{', ...' if len(distinct) > 10 else ''})"
    logging.getLogger("slimkit.data").info(note)
    return names, index, [note]


def _source(loc: str) -> str:
    """The file (or saved dataset) of a record's location ``file:line`` / ``folder [split] row n``."""
    return loc.split(" [", 1)[0] if " [" in loc else loc.rsplit(":", 1)[0]


def _resolve_columns(columns: Mapping[str, Column] | None, first: Record) -> dict[str, Column]:
    """The role -> column map, checked against the first row: every named column must be in it."""
    loc, row = first
    where, found = _source(loc), ", ".join(map(str, row))  # the file, without its line number
    headerless = bool(row) and all(isinstance(k, int) for k in row)
    if columns is None:
        if headerless:
            raise DataError(
                f"{where}: a file without a header needs columns by position "
                f"(e.g. columns: {{label: 0, text: 1}}; this file has columns 0..{len(row) - 1})"
            )
        columns = {role: role for role in ROLES if role in row}
    unknown = [k for k in columns if k not in ROLES]
    if unknown:
        raise DataError(f"columns.{unknown[0]}: unknown role (expected {', '.join(ROLES)})")
    if "text" not in columns:
        raise DataError(f"{where}: no 'text' column (found: {found}); pass columns={{'text': ...}}")
    if ("label" in columns) == ("score" in columns):
        raise DataError(f"{where}: need exactly one of a 'label' or a 'score' column (found: {found})")
    for role, spec in columns.items():
        if isinstance(spec, (list, tuple)) and role != "text":
            raise DataError(f"columns.{role}: must be one column (only columns.text may list several)")
        for col in spec if isinstance(spec, (list, tuple)) else [spec]:
            if col not in row:
                if headerless:
                    found = f"{len(row)} columns (positions 0..{len(row) - 1})"
                raise DataError(f"{loc}: missing column {col!r} (columns.{role}); found: {found}")
    return dict(columns)


def _extract(record: Record, roles: dict[str, Column], join: str = DEFAULT_JOIN) -> dict:
    loc, row = record
    out = {"text_pair": None}
    for role, spec in roles.items():
        values = []
        for col in spec if isinstance(spec, (list, tuple)) else [spec]:
            value = row.get(col)
            if value is None:
                what = "missing column" if col not in row else "empty value in column"
                raise DataError(f"{loc}: {what} {col!r} (columns.{role}); found: {', '.join(map(str, row))}")
            values.append(value)
        value = join.join(str(v) for v in values) if isinstance(spec, (list, tuple)) else values[0]
        out[role] = value if role != "score" else finite_number(value, loc, f"column {spec!r}")
    out["text"] = str(out["text"])
    if out["text_pair"] is not None:
        out["text_pair"] = str(out["text_pair"])
    if "label" in out:
        out["label"] = _label(out["label"], loc, roles["label"])
    return out


def _label(value, loc: str, col: str) -> str:
    label = str(value).strip()
    if not label:
        raise DataError(f"{loc}: empty label in column {col!r}")
    # A missing value written as NaN (or a JSON NaN/Infinity), not a class name.
    if label.lower() in ("nan", "-nan") or (isinstance(value, float) and not math.isfinite(value)):
        raise DataError(f"{loc}: label {short_repr(value)} in column {col!r} is not a class (NaN/inf)")
    return label


def _split(raw: dict[str, list[dict]], seed: int, val_fraction: float, test_fraction: float):
    rows = raw["train"]
    val = TextDataset(raw["val"]) if "val" in raw else None
    test = TextDataset(raw["test"]) if "test" in raw else None
    if val is None and test is None:
        return text_splits(rows, three_way(len(rows), val_fraction, test_fraction, seed))
    if test is None:
        train, test = text_splits(rows, two_way(len(rows), test_fraction, seed))
    elif val is None:
        train, val = text_splits(rows, two_way(len(rows), val_fraction, seed))
    else:
        train = TextDataset(rows)
    if test is None:
        raise DataError("test_fraction must be > 0 when no test file is given")
    return train, val, test


def _task(task: str | None, roles: dict[str, str]) -> str:
    auto = "classification" if "label" in roles else ("similarity" if "text_pair" in roles else "regression")
    if task is None:
        return auto
    allowed = ["classification"] if "label" in roles else ["regression", "similarity"]
    if task not in allowed:
        raise DataError(
            f"task {task!r} does not fit the columns {dict(roles)}; use one of {', '.join(allowed)}"
        )
    return task


def load_npz(
    path: str | Path,
    x_key: str = "x",
    y_key: str = "y",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataBundle:
    """Arrays ``x`` (N, ...) and ``y`` (N,) from a ``.npz``: classification if ``y`` is integer, else regression."""
    path = require_file(Path(path))
    x, y = _read_npz(path, x_key, y_key)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        if y.ndim != 1 or (y.size and y.min() < 0):
            raise DataError(f"{path}: integer labels {y_key!r} must be 1-D and >= 0")
        task, num_classes, yt = "classification", int(y.max()) + 1, torch.from_numpy(y.astype(np.int64))
    else:
        task, num_classes, yt = "regression", None, torch.from_numpy(y.astype(np.float32))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    parts = three_way(len(yt), val_fraction, test_fraction, seed)
    return tensor_bundle(path.stem, task, xt, yt, parts, num_classes, info={"file": str(path), "seed": seed})


def _read_npz(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not data.files:
                raise DataError(f"{path}: empty .npz file (no arrays; expected {x_key!r} and {y_key!r})")
            for key in (x_key, y_key):
                if key not in data.files:
                    raise DataError(f"{path}: no array {key!r} (found: {', '.join(data.files)})")
            x, y = data[x_key], data[y_key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # EOFError: a 0-byte file
        raise DataError(f"{path}: not a readable .npz file ({err or type(err).__name__})") from None
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or x.ndim < 1:
        raise DataError(
            f"{path}: array {x_key!r} must be numeric with a sample axis, got {x.dtype} {x.shape}"
        )
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} samples in {x_key!r} but {len(y)} in {y_key!r}")
    if len(x) == 0:
        raise DataError(f"{path}: no samples (arrays {x_key!r} and {y_key!r} are empty)")
    for key, arr in ((x_key, x), (y_key, y)):
        require_finite(arr, f"{path}: array {key!r}")
    return x, y


def load_image_folder(
    root: str | Path,
    size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataBundle:
    """Images ``root/<class>/*.png|jpg`` as float32 ``(N, C, H, W)`` in [0, 1]; classes in sorted order.

    ``size`` (an int or ``(height, width)``) resizes every image; without it all must share one size.
    """
    root = require_dir(Path(root), "image folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir()) if _is_image(p)
    ]
    if not files:
        raise DataError(f"{root}: no images found (expected {root}/<class>/*.png or *.jpg)")
    hw = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    images = [_read_image(p, hw, grayscale) for p, _ in files]
    for (p, _), img in zip(files, images):
        if img.shape != images[0].shape:
            raise DataError(
                f"{p}: size {img.shape[1:]} differs from {files[0][0]} {images[0].shape[1:]}; pass size="
            )
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor([c for _, c in files], dtype=torch.int64)
    parts = three_way(len(y), val_fraction, test_fraction, seed)
    info = {"folder": str(root), "seed": seed}
    return tensor_bundle(root.name, "classification", x, y, parts, len(classes), classes, info)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _read_image(path: Path, hw: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib

    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            if hw is not None:
                img = img.resize((hw[1], hw[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def load_hf_dataset(
    path: str | Path,
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    task: str | None = None,
    limit: int | None = None,
    label_names: Sequence[str] | None = None,
    join: str = DEFAULT_JOIN,
) -> DataBundle:
    """A text DataBundle from a dataset saved with ``datasets``' ``save_to_disk``.

    A DatasetDict's ``train``/``validation``/``test`` splits are used as given; missing ones
    are cut from ``train``. ``columns``, ``limit`` (first rows of each split), ``label_names``
    and ``join`` work as in :func:`load_table`.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("load_hf_dataset needs the `datasets` library: pip install datasets") from None
    hush_imported()  # its bars and logs off under --quiet (utils.quiet)
    path = require_dir(Path(path), "saved dataset folder")
    try:
        saved = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    parts = dict(saved.items()) if isinstance(saved, Mapping) else {"train": saved}
    sources = {}
    for split, part in parts.items():
        if split in HF_SPLITS:
            rows = part if limit is None else part.select(range(min(limit, len(part))))
            sources[HF_SPLITS[split]] = [
                (f"{path} [{split}] row {i + 1}", dict(ex)) for i, ex in enumerate(rows)
            ]
    if "train" not in sources:
        raise DataError(f"{path}: no 'train' split (found: {', '.join(map(str, parts))})")
    return bundle_from_records(
        path.name, sources, columns, seed, val_fraction, test_fraction, task, label_names, join
    )
