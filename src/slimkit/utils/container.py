"""A compact weights container: safetensors' layout with every tensor entropy-coded.

File layout: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON, then
the payload, the tensors' coded blobs one after another in header order. The
header is ``{"format", "header_crc32", "crc32", "tensors": {name: [dtype, shape,
coder, blob length]}, "metadata"}``: the coder of each tensor is the smallest of
:data:`slimkit.utils.entropy.CODERS` on its bytes (chosen by measurement when
writing), ``crc32`` covers the whole payload and ``header_crc32`` the header
itself (taken with ``00000000`` in its own place). Reading checks the header, the
payload's length and checksum and every tensor's decoded size before returning
anything, so a truncated or corrupt file is an error naming the part that is
wrong, never a half-filled model. Writes are atomic (:func:`atomic_path`).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimkit.errors import ModelError
from slimkit.utils.entropy import CODERS, CodingError, decode, encode_best
from slimkit.utils.io import atomic_path

FORMAT = "slimkit-entropy/1"
_DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_BLANK = "00000000"  # the header's own checksum is taken with this in its place


def _crc_field(value: str) -> bytes:
    return f'"header_crc32":"{value}"'.encode()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 2 bytes as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    view = torch.int16 if dtype == torch.bfloat16 else dtype
    np_dtype = torch.empty(0, dtype=view).numpy().dtype
    t = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np_dtype).copy()).reshape(shape)
    return t.view(dtype) if dtype == torch.bfloat16 else t


def write_container(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    coders: tuple[str, ...] = CODERS,
) -> int:
    """Write ``tensors`` (each with the best of ``coders``) and JSON ``metadata`` atomically; returns bytes."""
    entries, blobs = {}, []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ModelError(f"{name}: dtype {t.dtype} cannot be stored in a {FORMAT} container")
        coder, blob = encode_best(_tensor_bytes(t), coders)
        entries[name] = [_NAMES[t.dtype], list(t.shape), coder, len(blob)]
        blobs.append(blob)
    payload = b"".join(blobs)
    header = {"format": FORMAT, "header_crc32": _BLANK, "crc32": zlib.crc32(payload), "tensors": entries,
              "metadata": metadata or {}}  # fmt: skip
    head = json.dumps(header, separators=(",", ":")).encode()
    head = head.replace(_crc_field(_BLANK), _crc_field(f"{zlib.crc32(head):08x}"), 1)
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(head).to_bytes(8, "little") + head + payload)
    return Path(path).stat().st_size


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """The checked header and the payload (length and checksum verified)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"compressed weights file not found: {path}")
    blob = path.read_bytes()
    if len(blob) < 8:
        raise ModelError(f"{path}: header truncated (the file has {len(blob)} bytes)")
    size = int.from_bytes(blob[:8], "little")
    if size > min(len(blob) - 8, _MAX_HEADER):
        raise ModelError(f"{path}: header truncated or corrupt (says {size} bytes, file has {len(blob) - 8})")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: header corrupt (not JSON: {err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelError(f"{path}: header corrupt or not a {FORMAT} container")
    stored = str(header.get("header_crc32"))
    if f"{zlib.crc32(blob[8 : 8 + size].replace(_crc_field(stored), _crc_field(_BLANK), 1)):08x}" != stored:
        raise ModelError(f"{path}: header corrupt (checksum mismatch)")
    entries = header.get("tensors")
    if not isinstance(entries, dict) or not all(_valid_entry(e) for e in entries.values()):
        raise ModelError(f"{path}: header corrupt (bad tensor table)")
    payload = blob[8 + size :]
    expected = sum(e[3] for e in entries.values())
    if len(payload) != expected:
        raise ModelError(
            f"{path}: payload truncated or padded ({len(payload)} bytes, header says {expected})"
        )
    if zlib.crc32(payload) != header.get("crc32"):
        raise ModelError(f"{path}: payload corrupt (checksum mismatch)")
    return header, payload


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 4
        and entry[0] in _DTYPES
        and isinstance(entry[1], list)
        and all(isinstance(d, int) and d >= 0 for d in entry[1])
        and entry[2] in CODERS
        and isinstance(entry[3], int)
        and entry[3] >= 0
    )


def read_container(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a file written by :func:`write_container`, checked as a whole first."""
    header, payload = read_header(path)
    tensors, offset = {}, 0
    for name, (dtype_name, shape, coder, length) in header["tensors"].items():
        dtype = _DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        try:
            data = decode(coder, payload[offset : offset + length], count)
        except CodingError as err:
            raise ModelError(f"{path}: payload corrupt in tensor {name!r} ({err})") from None
        tensors[name] = _from_bytes(data, dtype, shape)
        offset += length
    return tensors, header.get("metadata") or {}
