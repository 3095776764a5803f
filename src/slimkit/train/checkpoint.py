"""Checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the model weights, the optimizer's tensors, the RNG
states and a JSON file with the trainer's counters, history and the optimizer's
hyper-parameters. Tensors inside the trainer state (a callback's pruning masks
or projection weights) go to ``state.safetensors``, each replaced in the JSON by
a reference. Nothing is pickled, so loading one cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimkit.errors import SlimkitError
from slimkit.utils.io import atomic_path, load_weights, save_weights


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt_state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, slots in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


_REF = "__tensor__"


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by ``{"__tensor__": key}``; the tensors are added to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_REF: key}
    if isinstance(obj, dict):
        return {k: split_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors) for v in obj]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            return tensors[obj[_REF]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    best_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    folder = Path(folder)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng = {"torch": torch.get_rng_state()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_weights(model, tmp / "model.safetensors")
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        if best_state is not None:
            save_file(best_state, str(tmp / "best.safetensors"))
        state_tensors: dict[str, torch.Tensor] = {}
        trainer_state = split_tensors(trainer_state, state_tensors)
        if state_tensors:
            save_file(state_tensors, str(tmp / "state.safetensors"))
        meta = {"trainer": trainer_state, "optimizer": opt_meta}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    return folder


def load_checkpoint(
    folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore the model (and, given ``optimizer``, the optimizer and RNG: see :func:`load_optimizer`)
    in place; return the trainer state and best weights."""
    folder = Path(folder)
    meta = _meta(folder)
    load_weights(model, folder / "model.safetensors")
    if optimizer is not None:
        load_optimizer(folder, optimizer)
    best_file = folder / "best.safetensors"
    best = load_file(str(best_file)) if best_file.is_file() else None
    state_file = folder / "state.safetensors"
    trainer = join_tensors(meta["trainer"], load_file(str(state_file)) if state_file.is_file() else {})
    return trainer, best


def load_optimizer(folder: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer's state and the RNG from a checkpoint.

    Separate from the weights because callbacks may add parameters to the optimizer when
    training begins (distillation projections): the Trainer loads this after them.
    """
    folder = Path(folder)
    meta = _meta(folder)
    opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])


def _meta(folder: Path) -> dict:
    if not (folder / "state.json").is_file():
        raise SlimkitError(f"not a slimkit checkpoint (no state.json): {folder}")
    return json.loads((folder / "state.json").read_text())
