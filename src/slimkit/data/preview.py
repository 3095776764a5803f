"""What a ``data:`` section will load, read from its files' headers and first rows (nothing is loaded in full).

``slimkit validate`` uses this to check data folders and formats, and to learn
the task (which validation metrics exist), the input shape (the sizes a
built-in model takes) and the class count, in well under a second even for a
large data set. Errors are :class:`DataError` naming the recipe field and the
file (``data.path: /data/mnist/t10k-images-idx3-ubyte.gz: not a readable gzip file``).
"""

from __future__ import annotations

import csv
import gzip
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimkit.data._common import resolve_dir
from slimkit.data.files import FORMATS, IMAGE_SUFFIXES, _resolve_columns, _task, iter_jsonl
from slimkit.data.lm import LM_TASK
from slimkit.data.mnist import IMAGE_MAGIC, IMAGES, LABEL_MAGIC, LABELS
from slimkit.data.registry import DATA_FILES, FILE_PATHS, DataConfig, check_path, read_label_names
from slimkit.errors import DataError

TEXT_TASKS = {
    "stsb": "similarity",
    "sst2": "classification",
    "sentiment": "classification",
    "trec": "classification",
    "wikitext2": LM_TASK,
    "tinyshakespeare": LM_TASK,
}
ENCODINGS = {"trec": "latin-1"}  # TREC has a Latin-1 byte; the others are UTF-8


@dataclass(frozen=True)
class DataPreview:
    """``task`` None: known only once the data is loaded (a saved HF dataset without ``task:``)."""

    task: str | None
    input_kind: str  # "tensor" or "text"
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None


def preview_data(config: DataConfig, prefix: str = "data") -> DataPreview:
    """Check the files ``config`` names and read what they hold; a DataError naming ``prefix.<field>``."""
    try:
        return _preview(config, prefix)
    except DataError as err:
        text = str(err)
        if text.startswith(prefix + "."):
            raise DataError(text) from None
        # the field it names: a column the file lacks is the columns entry's fault, not the path's
        role = re.search(r"\(columns\.(\w+)\)", text)
        field = f"columns.{role.group(1)}: " if role else "path: "
        if text.startswith(("columns.", "label_names")):
            field = ""
        raise DataError(f"{prefix}.{field}{text}") from None


def _preview(config: DataConfig, prefix: str) -> DataPreview:
    name = config.name
    if name == "digits":
        return DataPreview("classification", "tensor", (1, 8, 8), 10)
    path = check_path(config.path, None, f"{prefix}.path", name in FILE_PATHS)
    if name in DATA_FILES:
        subdir, names = DATA_FILES[name](config)
        folder = resolve_dir(path, subdir, names)
        if name == "mnist":
            return _mnist(folder)
        for file in names:
            _first_line(folder / file, ENCODINGS.get(name, "utf-8"))
        return DataPreview(TEXT_TASKS[name], "text", None, 2 if name in ("sst2", "sentiment") else None)
    classes = None  # known before loading only from label_names
    if name in ("table", "hf_dataset") and config.label_names is not None:
        classes = len(read_label_names(config.label_names, None, f"{prefix}.label_names"))
    if name == "table":
        for field in ("val_path", "test_path"):
            if getattr(config, field):
                extra = check_path(getattr(config, field), None, f"{prefix}.{field}", is_file=True)
                try:
                    _table_roles(extra, config)
                except DataError as err:
                    raise DataError(f"{prefix}.{field}: {err}") from None
        return DataPreview(_task(config.task, _table_roles(path, config)), "text", None, classes)
    if name == "text":  # language modelling on the user's own text: read as text when loaded
        _first_line(path, "utf-8")
        return DataPreview(LM_TASK, "text")
    if name == "npz":
        return _npz(path, config.x_key or "x", config.y_key or "y")
    if name == "image_folder":
        return _image_folder(path, config)
    return DataPreview(config.task, "text", None, classes)  # hf_dataset: the Arrow files are read when loaded


def _mnist(folder: Path) -> DataPreview:
    images = _idx_dims(folder / IMAGES, IMAGE_MAGIC)
    labels = _idx_dims(folder / LABELS, LABEL_MAGIC)
    if images[1:] != [28, 28]:
        raise DataError(f"{folder / IMAGES}: expected N x 28 x 28 images, the header says {images}")
    if labels[0] != images[0]:
        raise DataError(f"{folder / LABELS}: {labels[0]} labels for {images[0]} images")
    return DataPreview("classification", "tensor", (1, 28, 28), 10)


def _idx_dims(path: Path, magic: int) -> list[int]:
    """The dimensions in a gzipped IDX file's header (its first bytes only)."""
    ndim = magic & 0xFF
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    if len(head) < 4 + 4 * ndim or int.from_bytes(head[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file (bad header; expected magic number {magic})")
    return [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]


def _first_line(path: Path, encoding: str) -> str:
    try:
        with open(path, encoding=encoding, newline="") as f:
            return f.readline()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid {encoding} text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _table_roles(path: Path, config: DataConfig) -> dict[str, str]:
    """The column roles of a table file, from its header and first row (as the loader resolves them)."""
    fmt = config.format or FORMATS.get(path.suffix.lower())
    if fmt not in FORMATS.values():
        raise DataError(f"{path}: cannot tell the format from the suffix; set format: csv, tsv or jsonl")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if fmt == "jsonl":
                first = _first_json_row(f, path)
            elif config.header is False:
                first = _first_headerless_row(f, path, fmt)
            else:
                first = _first_delimited_row(f, path, fmt)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return _resolve_columns(config.columns, first)


def _first_delimited_row(f, path: Path, fmt: str) -> tuple[str, dict]:
    reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
    try:
        row = next(reader, None)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: {err}") from None
    if reader.fieldnames is None:
        raise DataError(f"{path}: empty file (expected a header line)")
    if row is None:
        raise DataError(f"{path}: no data rows")
    return f"{path}:{reader.line_num}", row


def _first_headerless_row(f, path: Path, fmt: str) -> tuple[str, dict]:
    """The first non-blank row of a file without a header, keyed by 0-based column position."""
    reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
    try:
        values = next((v for v in reader if v), None)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: {err}") from None
    if values is None:
        raise DataError(f"{path}: no data rows")
    return f"{path}:{reader.line_num}", dict(enumerate(values))


def _first_json_row(f, path: Path) -> tuple[str, dict]:
    first = next(iter_jsonl(f, path), None)
    if first is None:
        raise DataError(f"{path}: no data rows")
    return first


def _npz(path: Path, x_key: str, y_key: str) -> DataPreview:
    """Shapes and dtypes from the ``.npy`` headers inside the archive (the arrays are not read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = [n.removesuffix(".npy") for n in archive.namelist()]
            if not found:
                raise DataError(f"{path}: empty .npz file (no arrays; expected {x_key!r} and {y_key!r})")
            for key in (x_key, y_key):
                if key not in found:
                    raise DataError(f"{path}: no array {key!r} (found: {', '.join(found)})")
            x_shape, _ = _npy_header(archive, x_key)
            y_shape, y_dtype = _npy_header(archive, y_key)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if not x_shape or not y_shape or x_shape[0] != y_shape[0]:
        raise DataError(f"{path}: {x_key!r} has shape {x_shape} but {y_key!r} has shape {y_shape}")
    integer = np.issubdtype(y_dtype, np.integer) or y_dtype == np.bool_
    return DataPreview("classification" if integer else "regression", "tensor", tuple(x_shape[1:]))


def _npy_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    npy = np.lib.format
    with archive.open(f"{key}.npy") as f:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(f)
        else:  # a rare newer header: read the array itself
            f.seek(0)
            array = npy.read_array(f, allow_pickle=False)
            shape, dtype = array.shape, array.dtype
    return tuple(shape), dtype


def _image_folder(root: Path, config: DataConfig) -> DataPreview:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    first = next(
        (
            p
            for c in classes
            for p in sorted(c.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ),
        None,
    )
    if first is None:
        raise DataError(f"{root}: no images found (expected {root}/<class>/*.png or *.jpg)")
    channels = 1 if config.grayscale else 3
    if config.size is not None:
        hw = (config.size, config.size) if isinstance(config.size, int) else tuple(config.size)
    else:
        hw = _image_size(first)
    return DataPreview("classification", "tensor", (channels, *hw), len(classes))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return height, width
