"""Sparse weight files that really shrink with sparsity, and load back bit for bit.

A mostly-zero tensor ``w`` is stored as two safetensors entries:
``w::bitmask`` (``np.packbits`` of ``w != 0``, 1 bit per weight) and
``w::values`` (the non-zero values in order); the rare ``-0.0`` entries are
listed in ``w::negzero`` so that the round trip is bit-exact. Other tensors
are stored dense.
The file is an ordinary safetensors file; ``compress=True`` additionally
zlib-compresses it behind a small magic header.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from slimkit.errors import ModelError
from slimkit.prune.depth import drop_blocks_, kept_blocks
from slimkit.prune.slicers import find_slicer, head_count_attrs, slice_layer_
from slimkit.utils.io import atomic_path, load_weights, load_weights_file, save_weights, state_dict_for_saving

MAGIC = b"SLIMKIT-ZLIB-SAFETENSORS\n"
BLOCKS_KEY = "slimkit_blocks"  # save_pruned: the block list and the original indices of its blocks


def _negative_zeros(flat: torch.Tensor) -> torch.Tensor:
    return torch.nonzero((flat == 0) & torch.signbit(flat)).flatten()


def _worth_sparse(t: torch.Tensor, nonzero: int) -> bool:
    # Bitmask (1 bit each) plus values must beat the dense bytes.
    dense = t.numel() * t.element_size()
    return t.numel() >= 64 and (t.numel() + 7) // 8 + nonzero * t.element_size() < dense


def encode_sparse(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into dense entries and bitmask+values entries."""
    out: dict[str, torch.Tensor] = {}
    layout: dict[str, list] = {}
    for name, t in state.items():
        if "::" in name:
            raise ModelError(f"{name}: tensor names containing '::' cannot be stored sparsely")
        if t.is_floating_point() and t.dim() > 0:
            flat = t.detach().contiguous().flatten()
            bits = flat != 0  # NaN counts as non-zero, so it is kept as a value
            nonzero = int(bits.sum())
            if _worth_sparse(t, nonzero):
                out[f"{name}::bitmask"] = torch.from_numpy(np.packbits(bits.numpy()))
                out[f"{name}::values"] = flat[bits].clone()
                negzero = _negative_zeros(flat)
                if negzero.numel():
                    out[f"{name}::negzero"] = negzero
                layout[name] = list(t.shape)
                continue
        out[name] = t.contiguous()
    return out, {"slimkit_sparse": json.dumps(layout)}


def decode_sparse(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    layout = json.loads((metadata or {}).get("slimkit_sparse", "{}"))
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for name, shape in layout.items():
        values = tensors[f"{name}::values"]
        numel = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(tensors[f"{name}::bitmask"].numpy(), count=numel).astype(bool)
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[torch.from_numpy(bits)] = values
        if f"{name}::negzero" in tensors:
            flat[tensors[f"{name}::negzero"]] = -0.0
        state[name] = flat.view(shape)
    return state


def save_sparse(model_or_state: nn.Module | dict[str, torch.Tensor], path, compress: bool = False) -> int:
    """Write the weights sparsely (atomic); returns the file size in bytes."""
    state = (
        state_dict_for_saving(model_or_state)
        if isinstance(model_or_state, nn.Module)
        else {k: v.detach().cpu() for k, v in model_or_state.items()}
    )
    tensors, metadata = encode_sparse(state)
    blob = st_save(tensors, metadata=metadata)
    if compress:
        blob = MAGIC + zlib.compress(blob, 9)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(blob)
    return Path(path).stat().st_size


def load_sparse_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict stored in a sparse (optionally compressed) file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"sparse weights file not found: {path}")
    blob = path.read_bytes()
    if blob.startswith(MAGIC):
        try:
            blob = zlib.decompress(blob[len(MAGIC) :])
        except zlib.error as err:
            raise ModelError(f"{path}: corrupt compressed weights ({err})") from None
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    except Exception as err:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a safetensors file ({err})") from None
    return decode_sparse(tensors, metadata)


def load_sparse(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (checked before anything changes)."""
    state = load_sparse_file(path)
    own = model.state_dict()
    wrong = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        detail = (
            "not in the model"
            if k not in own
            else f"file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        )
        raise ModelError(f"{path} does not fit the model: {k} ({detail})")
    ptrs = {own[k].untyped_storage().data_ptr() for k in state}
    missing = [k for k in own if k not in state and own[k].untyped_storage().data_ptr() not in ptrs]
    if missing:
        raise ModelError(f"{path} lacks weights: {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False)
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike) -> int:
    """Save a structurally pruned model: its (smaller) weights, the changed head counts, and which
    blocks depth pruning kept."""
    attrs = {name: head_count_attrs(m) for name, m in model.named_modules()}
    attrs = {n: a for n, a in attrs.items() if a}
    metadata = {"slimkit_structure": json.dumps(attrs)}
    blocks = kept_blocks(model)
    if blocks is not None:
        metadata[BLOCKS_KEY] = json.dumps({"list": blocks[0], "kept": blocks[1]})
    return save_weights(model, path, metadata=metadata)


def _drop_blocks_as_stored_(model: nn.Module, blocks: dict | None, path) -> None:
    """Depth pruning first (it renames the blocks the other entries then refer to)."""
    if blocks is None:
        return
    layers = dict(model.named_modules()).get(blocks["list"])
    kept = blocks["kept"]
    if not isinstance(layers, nn.ModuleList) or not kept or max(kept) >= len(layers):
        raise ModelError(f"{path}: keeps blocks {kept} of {blocks['list']!r}, which this model does not have")
    drop_blocks_(model, blocks["list"], kept)


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Shrink a freshly built (unpruned) ``model`` to the shapes stored by :func:`save_pruned`, then load.

    Layers are shrunk through the slicer table (:mod:`slimkit.prune.slicers`),
    dropping trailing positions that the stored weights then overwrite; any
    mismatch no slicer explains is an error naming the tensor, raised before
    the model changes.
    """
    state = load_weights_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    attrs = json.loads(metadata.get("slimkit_structure", "{}"))
    _drop_blocks_as_stored_(model, json.loads(metadata[BLOCKS_KEY]) if BLOCKS_KEY in metadata else None, path)
    modules = dict(model.named_modules())
    shrink = {}
    for key, tensor in state.items():
        mod_name, _, tname = key.rpartition(".")
        module = modules.get(mod_name)
        current = getattr(module, tname, None) if module is not None else None
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape and mod_name not in shrink:
            shrink[mod_name] = _removal(module, mod_name, state, path)
    with torch.no_grad():
        for name, remove in shrink.items():
            slice_layer_(modules[name], remove, name)
    for name, values in attrs.items():
        if name in modules:
            for attr, value in values.items():
                setattr(modules[name], attr, value)
    return load_weights(model, path)


def _removal(module: nn.Module, name: str, state: dict[str, torch.Tensor], path) -> dict[int, set[int]]:
    """``{logical dim: trailing positions}`` that bring ``module`` to the stored shapes (checked first)."""
    slicer = find_slicer(module)
    try:
        layout = slicer.layout(module) if slicer is not None else {}
        sizes = slicer.sizes(module) if slicer is not None else {}
    except ModelError as err:
        raise ModelError(f"{path}: {name}: {err}") from None
    new = dict(sizes)
    for tname, dims in layout.items():
        stored = state.get(f"{name}.{tname}")
        if stored is not None:
            new.update({d: stored.shape[t] for d, t in dims.items() if d in sizes})
    for tname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        stored = state.get(f"{name}.{tname}")
        expected = list(tensor.shape)
        for d, t in layout.get(tname, {}).items():
            if d in new:
                expected[t] = new[d]
        if stored is not None and (list(stored.shape) != expected or any(new[d] > sizes[d] for d in sizes)):
            raise ModelError(
                f"{path}: {name}.{tname} has shape {tuple(stored.shape)}, model {tuple(tensor.shape)}"
            )
    return {d: set(range(new[d], sizes[d])) for d in sizes if new[d] < sizes[d]}
