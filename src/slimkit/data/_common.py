"""Helpers shared by the loaders: file checks, deterministic splits, label maps."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from slimkit.config import short_repr
from slimkit.data.base import DataBundle, TextDataset
from slimkit.errors import DataError


def require_file(path: Path, what: str = "file") -> Path:
    """``path`` if it is an existing file, else a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def require_finite(arr: np.ndarray, what: str) -> None:
    """A DataError naming the first sample (and position in it) holding a NaN or inf.

    Non-finite inputs or targets train a model into NaN weights while every step still
    "succeeds", so they are refused when the data load. Only float arrays can hold them.
    """
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)):
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    flat = int(np.flatnonzero(~finite)[0])
    row, rest = divmod(flat, max(int(np.prod(arr.shape[1:])), 1))
    where = f"sample {row} (0-based)"
    if arr.ndim > 1:
        where += f", position {tuple(int(i) for i in np.unravel_index(rest, arr.shape[1:]))}"
    value = arr.reshape(-1)[flat]
    raise DataError(f"{what}, {where}: {value} (NaN and infinite values are refused)")


def finite_number(value, loc: str, what: str) -> float:
    """``value`` as a float, or a DataError naming the row ``loc`` and ``what`` (``column 'score'``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{loc}: {what} is not a number: {short_repr(value)}") from None
    if not np.isfinite(number):
        raise DataError(
            f"{loc}: {what} is {short_repr(value)}, not a finite number (NaN and inf are refused)"
        )
    return number


def require_dir(path: Path, what: str = "folder") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def resolve_dir(root: str | Path, subdir: str, names: Sequence[str]) -> Path:
    """The folder holding ``names``: ``root`` itself or ``root/subdir``.

    Accepting both lets a recipe point at the shared data root or straight at
    one data set's folder.
    """
    root = Path(root)
    for cand in (root, root / subdir):
        if all((cand / n).is_file() for n in names):
            return cand
    base = root / subdir if (root / subdir).is_dir() else root
    missing = next((base / n for n in names if not (base / n).is_file()), base / names[0])
    raise DataError(f"file not found: {missing}")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")


def split_counts(n: int, counts: Sequence[int], seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into parts of ``counts`` (the rest last)."""
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *counts])
    if bounds[-1] > n:
        raise DataError(f"cannot take {bounds[-1]} samples from {n}")
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])] + [order[bounds[-1] :]]


def three_way(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, val, test) index arrays; test and val sizes are rounded fractions of ``n``."""
    check_fractions(val_fraction, test_fraction)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    if n_test == 0:
        raise DataError(f"test_fraction {test_fraction} of {n} samples leaves an empty test split")
    if n_test + n_val >= n:
        raise DataError(f"{n} samples are too few to split off {n_test} test and {n_val} val samples")
    test, val, train = split_counts(n, [n_test, n_val], seed)
    return train, val, test


def two_way(n: int, held_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) index arrays with ``round(held_fraction * n)`` held out."""
    check_fractions(held_fraction, 0.0)
    n_held = round(held_fraction * n)
    if n_held >= n:
        raise DataError(f"{n} samples are too few to hold out {n_held}")
    held, kept = split_counts(n, [n_held], seed)
    return kept, held


def tensor_splits(
    x: torch.Tensor, y: torch.Tensor, parts: Iterable[np.ndarray]
) -> list[TensorDataset | None]:
    """One TensorDataset per index array; an empty part becomes None (no val split)."""
    out = []
    for idx in parts:
        idx = torch.as_tensor(np.sort(idx), dtype=torch.long)
        out.append(TensorDataset(x[idx], y[idx]) if len(idx) else None)
    return out


def text_splits(rows: Sequence[dict], parts: Iterable[np.ndarray]) -> list[TextDataset | None]:
    out = []
    for idx in parts:
        out.append(TextDataset([rows[i] for i in np.sort(idx)]) if len(idx) else None)
    return out


def label_map(values: Iterable[str]) -> list[str]:
    """Sorted distinct label names; numerically when every label is an integer ("2" < "10")."""
    names = sorted(set(values))
    if all(_is_int(v) for v in names):
        names.sort(key=int)
    return names


def note_label_map(source: str, names: Sequence[str]) -> list[str]:
    """Say (in the log and the bundle's notes) how labels became classes: integer labels renumbered
    (e.g. 1..5 -> 0..4), string labels in sorted order. Labels 0..N-1 as they are: nothing to say.

    A user whose labels are 1-based would otherwise find class 0 meaning their label 1 silently.
    """
    if not names or list(names) == [str(i) for i in range(len(names))]:
        return []
    shown = ", ".join(f"{n}->{i}" for i, n in enumerate(names[:10])) + (", ..." if len(names) > 10 else "")
    if all(_is_int(n) for n in names):
        note = f"{source}: integer labels renumbered to classes 0..{len(names) - 1} ({shown})"
    else:  # string labels: the order is sorted by name; label_names sets another
        note = f"{source}: labels mapped to classes in sorted order ({shown}); label_names sets another order"
    logging.getLogger("slimkit.data").info(note)
    return [note]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def split_sizes(**splits) -> dict[str, int]:
    """``{"train": 7200, ...}`` for the bundle's info, skipping absent splits."""
    return {k: len(v) for k, v in splits.items() if v is not None}


def tensor_bundle(
    name: str,
    task: str,
    x: torch.Tensor,
    y: torch.Tensor,
    parts,
    num_classes=None,
    label_names=None,
    info=None,
) -> DataBundle:
    """A tensor DataBundle from whole arrays and (train, val, test) index arrays."""
    splits = tensor_splits(x, y, parts)
    return _bundle(name, task, splits, "tensor", num_classes, label_names, tuple(x.shape[1:]), info)


def text_bundle(name: str, task: str, splits, label_names=None, info=None) -> DataBundle:
    """A text DataBundle from (train, val, test) TextDatasets; val may be None."""
    num_classes = len(label_names) if label_names else None
    return _bundle(name, task, splits, "text", num_classes, label_names, None, info)


def _bundle(name, task, splits, input_kind, num_classes, label_names, input_shape, info) -> DataBundle:
    train, val, test = splits
    return DataBundle(
        name=name,
        task=task,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_kind=input_kind,
        input_shape=input_shape,
        label_names=list(label_names) if label_names else None,
        info={**(info or {}), "sizes": split_sizes(train=train, val=val, test=test)},
    )
