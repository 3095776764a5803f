"""MNIST from gzipped IDX files (only the 10,000 test images are assumed present)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from slimkit.data._common import check_fractions, resolve_dir, split_counts, tensor_bundle
from slimkit.data.base import DataBundle
from slimkit.errors import DataError

IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes, checking its magic number and size."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    ndim = magic & 0xFF  # the last magic byte is the number of dimensions, the one before the dtype
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad IDX magic number {found}, expected {magic}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: size {len(raw)} bytes does not match header dims {dims} ({expected} bytes)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_mnist(root: str | Path, seed: int = 0, n_train: int = 8000, val_fraction: float = 0.1) -> DataBundle:
    """Split the 10k MNIST test images into train (``n_train``, minus a val part) and test (the rest).

    ``root`` is the folder holding the two ``t10k-*.gz`` files, or one that has them under ``mnist/``.
    Images are float32 ``(N, 1, 28, 28)`` scaled to [0, 1]; labels int64 0..9.
    """
    folder = resolve_dir(root, "mnist", [IMAGES, LABELS])
    images = read_idx(folder / IMAGES, IMAGE_MAGIC)
    labels = read_idx(folder / LABELS, LABEL_MAGIC)
    _check_pair(folder, images, labels, n_train)
    check_fractions(val_fraction, 0.0)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    n_val = round(val_fraction * n_train)
    if n_val >= n_train:
        raise DataError(f"val_fraction {val_fraction} of n_train {n_train} leaves no training images")
    val_idx, train_idx, test_idx = split_counts(len(y), [n_val, n_train - n_val], seed)
    info = {"files": [str(folder / IMAGES), str(folder / LABELS)], "seed": seed}
    digits = [str(i) for i in range(10)]
    return tensor_bundle("mnist", "classification", x, y, [train_idx, val_idx, test_idx], 10, digits, info)


def _check_pair(folder: Path, images: np.ndarray, labels: np.ndarray, n_train: int) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{folder / IMAGES}: expected N x 28 x 28 images, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{folder / LABELS}: {labels.shape} labels for {len(images)} images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{folder / LABELS}: label {int(labels.max())} outside 0..9")
    if not 0 < n_train < len(images):
        raise DataError(f"n_train must be in 1..{len(images) - 1} for {len(images)} images, got {n_train}")
