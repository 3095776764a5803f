"""A causal LM written as a plain Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` opens.

The folder holds ``config.json``, ``generation_config.json`` and ``model.safetensors`` (the caller adds
the tokenizer's files). It is only written for a model that still has the architecture's own tensors
(float weights, or bfloat16 Linear weights): a model with slimkit layers (int8/int4 codes, pruned
shapes) does not fit the architecture's class and is refused, naming the first tensor that differs.

dtype: a model with any bfloat16 tensor is written as a bfloat16 model (every float tensor in
bfloat16, ``dtype: bfloat16`` in the config), since a Hugging Face model has one dtype; otherwise
float32. The names of the Linear layers that were bfloat16 are kept in the file's metadata
(``slimkit_bf16_linear``) so that slimkit can rebuild the same layers (:func:`bf16_linears`).
A tied output embedding is stored once, as the architecture's ``save_pretrained`` does.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimkit.errors import ModelError
from slimkit.utils.io import atomic_path, load_state, load_weights_file, state_dict_for_saving

WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE)
BF16_KEY = "slimkit_bf16_linear"


def save_hf_folder(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` to the folder ``path`` (atomically); returns the bytes of the files written."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)):
        raise ModelError(f"{type(model).__name__} is not a Hugging Face model: it has no folder form")
    bf16 = [n for n, m in model.named_modules() if _is_bf16_linear(m)]
    state = state_dict_for_saving(model)
    dtype = torch.bfloat16 if any(t.dtype == torch.bfloat16 for t in state.values()) else torch.float32
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    config = copy.deepcopy(config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.tie_word_embeddings = _store_head_once(model, state)
    _check_fits(model, config, state)
    metadata = {"format": "pt", **({BF16_KEY: json.dumps(bf16)} if bf16 else {})}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
        for file in tmp.iterdir():  # safetensors writes 0600; the folder is meant to be shared
            os.chmod(file, 0o644)
    return folder_bytes(path)


def folder_form_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written by :func:`save_hf_folder` (None when it can); nothing is copied.

    A pruned model has a folder form when its config states its new shapes (every block the same).
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)):
        return f"{type(model).__name__} is not a Hugging Face model"
    state = dict(model.state_dict())
    config = copy.deepcopy(config)
    config.tie_word_embeddings = _store_head_once(model, state)
    try:
        _check_fits(model, config, state)
    except ModelError as err:
        return str(err)
    return None


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model's files in a folder (config, generation config, weights; not the tokenizer)."""
    return sum((Path(path) / name).stat().st_size for name in MODEL_FILES if (Path(path) / name).is_file())


def _is_bf16_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
    )


def _embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    """State-dict keys of the input and output embedding matrices (None where the model has none)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        found.append(f"{names[id(module)]}.weight" if id(module) in names else None)
    return found[0], found[1]


def _tied(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _store_head_once(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Drop the output embedding when it is the input one (tied); returns whether the folder is tied.

    A tie the model lost (a head that now differs from the table) is written untied, with both.
    """
    if not _tied(model.config):
        return False
    inp, out = _embedding_names(model)
    if out not in state:  # one tensor in the model: state_dict_for_saving kept the first name only
        return True
    if inp in state and torch.equal(state[inp], state[out]):
        del state[out]  # equal once written (a bfloat16 head made from the table): stored once
        return True
    return False


def _check_fits(model: nn.Module, config, state: dict[str, torch.Tensor]) -> None:
    """The tensors are the ones a fresh model of this class has (names and shapes), else a ModelError."""
    with torch.device("meta"):
        reference = type(model)(config)
    own = reference.state_dict()
    inp, out = _embedding_names(reference)
    for key, tensor in state.items():
        if key not in own or tuple(own[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{type(model).__name__}: {key!r} {tuple(tensor.shape)} is not a tensor of a plain "
                f"{type(model).__name__} (a slimkit layer); it has no Hugging Face folder form"
            )
    missing = [k for k in own if k not in state and not (k == out and _tied(config) and inp in state)]
    if missing:
        raise ModelError(f"{type(model).__name__}: no tensor for {', '.join(missing[:3])}; no folder form")


def bf16_linears(path: str | os.PathLike) -> list[str]:
    """The Linear layers that were bfloat16 in the model written to the folder ``path``."""
    file = Path(path) / WEIGHTS_FILE
    load_weights_file(file)  # a missing or damaged file is named before its metadata is read
    with safe_open(str(file), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(BF16_KEY, "[]"))


def load_hf_folder(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fill ``model`` (same architecture) in place from the folder ``path``.

    Float tensors take the model's dtype (a bfloat16 folder into a float32 model gives float32
    tensors holding the bfloat16 values); an output embedding stored once with the input one
    fills a head that the model keeps apart (a bfloat16 head rebuilt by the caller).
    """
    file = Path(path) / WEIGHTS_FILE
    state = load_weights_file(file)
    own = model.state_dict()
    inp, out = _embedding_names(model)
    if out in own and out not in state and inp in state and not _same_storage(own[out], own[inp]):
        state[out] = state[inp]
    for key, tensor in state.items():
        if key in own and tensor.is_floating_point() and own[key].is_floating_point():
            state[key] = tensor.to(own[key].dtype)
    return load_state(model, state, file)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
