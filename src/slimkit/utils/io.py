"""Atomic file output and safe weight loading.

Outputs are written to a temporary sibling and renamed into place, so an
interrupted run never leaves a half-written file that looks complete.
Weights are only ever read with safetensors: no pickle, no code execution.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimkit.errors import ModelError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    Works for files and folders. On an exception the temporary path is removed
    and ``final`` keeps whatever it held before.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / "out"
    try:
        yield target
        if target.is_file() and not target.is_symlink():
            # The permissions a plain open() gives (safetensors writes its files 0600).
            os.chmod(target, 0o666 & ~_umask())
        if final.is_dir() and not final.is_symlink():
            # A rename cannot replace a non-empty folder: move the old one aside first (inside ``tmp``,
            # so that nothing is left beside ``final``), and back if the second rename fails.
            old = tmp / "old"
            os.replace(final, old)
            try:
                os.replace(target, final)
            except BaseException:
                os.replace(old, final)
                raise
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous, de-aliased copy of the model's state dict.

    safetensors refuses tensors that share memory (tied embeddings); the
    first name keeps the tensor and later aliases are dropped, which
    ``load_weights`` restores through ``strict=False`` plus the tie itself.
    """
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().clone()
    return out


def save_weights(model_or_state: torch.nn.Module | dict[str, torch.Tensor], path, metadata=None) -> int:
    """Save weights as safetensors, atomically. Returns the file's size in bytes."""
    state = (
        state_dict_for_saving(model_or_state)
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path).stat().st_size


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: only .safetensors weights are loaded (pickled checkpoints can run code)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # corrupt, truncated or empty
        why = "an empty file" if path.stat().st_size == 0 else f"{str(err).strip()[:200]}"
        raise ModelError(f"{path}: not a readable safetensors file ({why})") from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a safetensors file into ``model`` in place, naming any mismatch."""
    return load_state(model, load_weights_file(path), path)


def load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> torch.nn.Module:
    """Load ``state`` (read from ``path``, which errors name) into ``model`` in place, checked."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or wrong:
        details = [f"unexpected: {', '.join(unexpected[:5])}"] if unexpected else []
        details += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]]
        raise ModelError(f"{path} does not fit the model ({'; '.join(details)})")
    _check_dtypes_and_values(path, state, own)
    missing = set(own) - set(state)
    # Tied weights were saved once; anything else missing is an error.
    missing = {k for k in missing if not _is_alias(model, k, state)}
    if missing:
        raise ModelError(f"{path} lacks weights: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(state, strict=False)
    return model


def _check_dtypes_and_values(path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Refuse a tensor whose dtype differs from the model's (load_state_dict would cast it silently:
    int8 codes would become float weights of -128..127) or that holds NaN/inf."""
    for name, tensor in state.items():
        if name in own and tensor.dtype != own[name].dtype:
            raise ModelError(
                f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} in the file but "
                f"{str(own[name].dtype).removeprefix('torch.')} in the model (quantized or converted weights "
                "need the model they were saved from)"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: tensor {name!r} holds NaN or infinite values")


def _is_alias(model: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    ptr = own[name].untyped_storage().data_ptr()
    return any(own[k].untyped_storage().data_ptr() == ptr for k in state if k in own and k != name)
