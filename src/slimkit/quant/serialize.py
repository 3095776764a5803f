"""Save and reload quantized models as safetensors (integer weights stay integers on disk).

The file holds the model's state dict with int8 codes as ``int8``, 4-bit codes
packed two per byte (``uint8``), scales in float32, and a JSON description of
every quantized layer in the safetensors metadata. ``load_quantized`` rebuilds
those layers on a freshly built float model of the same architecture, so the
size on disk is parameters x bits / 8 plus scales, biases and float layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from slimkit.errors import ModelError
from slimkit.quant.codecs import LayerCodec
from slimkit.quant.method import layer_codecs
from slimkit.quant.modules import FoldedBatchNorm
from slimkit.quant.plan import get_module, set_module
from slimkit.utils.container import read_container, write_container
from slimkit.utils.entropy import CODERS
from slimkit.utils.io import load_weights_file, save_weights, state_dict_for_saving

META_KEY = "slimkit_quant"


def _codec_of(module: nn.Module, codecs: dict[type, LayerCodec]) -> LayerCodec | None:
    return next((codecs[cls] for cls in type(module).__mro__ if cls in codecs), None)


def quantized_layers(model: nn.Module) -> dict[str, tuple[nn.Module, LayerCodec]]:
    """``{name: (layer, codec)}`` for every layer of ``model`` that a registered codec saves."""
    codecs = {codec.cls: codec for codec in layer_codecs()}
    found = {name: (m, _codec_of(m, codecs)) for name, m in model.named_modules()}
    return {name: (m, codec) for name, (m, codec) in found.items() if codec is not None}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` (after ``convert_``) to ``path`` (.safetensors); returns the file size in bytes."""
    layers, state = _packed(model)
    return save_weights(state, path, metadata={META_KEY: json.dumps(layers)})


def _packed(model: nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The layers' JSON descriptions and the state dict as the codecs write it."""
    found = quantized_layers(model)
    if all(codec.cls is FoldedBatchNorm for _, codec in found.values()):
        raise ModelError(f"{type(model).__name__} has no quantized layer to save (run quantize_ first)")
    layers = {name: {"class": codec.name, **codec.describe(m)} for name, (m, codec) in found.items()}
    state = state_dict_for_saving(model)
    for name, (_, codec) in found.items():
        if codec.pack is not None:
            codec.pack(state, name, layers[name])
    return layers, state


def read_layers(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"quantized weights file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise ModelError(f"{path} is not a slimkit quantized model (no '{META_KEY}' metadata)")
    return json.loads(meta[META_KEY])


def _rebuild(
    float_module: nn.Module,
    info: dict[str, Any],
    state: dict[str, torch.Tensor],
    name: str,
    codec: LayerCodec,
) -> nn.Module:
    mod = codec.rebuild(float_module, info)
    for buffer in ("bias_value", "in_scale"):
        if f"{name}.{buffer}" in state and getattr(mod, buffer, None) is None:
            mod.register_buffer(buffer, torch.zeros_like(state[f"{name}.{buffer}"]))
    return mod


def _codecs_for(layers: dict[str, dict[str, Any]]) -> dict[str, LayerCodec]:
    by_name = {codec.name: codec for codec in layer_codecs()}
    for name, info in layers.items():
        if info["class"] not in by_name:
            raise ModelError(f"{name}: unknown quantized layer class {info['class']!r}")
    return {name: by_name[info["class"]] for name, info in layers.items()}


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized layers recorded in ``path`` on ``model`` (float, same architecture) and load."""
    return _load_layers(model, read_layers(path), load_weights_file(path), path)


def save_compressed(model: nn.Module, path: str | os.PathLike, coders: tuple[str, ...] = CODERS) -> int:
    """Like :func:`save_quantized`, but every tensor entropy-coded (:mod:`slimkit.utils.container`).

    The layers are packed by the same codecs; each tensor then gets the smallest
    of ``coders`` (default: all of :data:`slimkit.utils.entropy.CODERS`, measured;
    ``("raw", "bitpack")`` gives plain b-bit packing). Returns the file size in
    bytes: the whole file, header included.
    """
    layers, state = _packed(model)
    return write_container(path, state, {META_KEY: layers}, coders)


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_compressed` on ``model`` (float, same architecture)."""
    state, metadata = read_container(path)
    layers = metadata.get(META_KEY)
    if not isinstance(layers, dict) or not all(isinstance(v, dict) and "class" in v for v in layers.values()):
        raise ModelError(f"{path}: header corrupt (no '{META_KEY}' layer table)")
    try:
        return _load_layers(model, layers, state, path)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a header whose table does not fit
        raise ModelError(f"{path}: header corrupt or does not fit {type(model).__name__} ({err})") from None


def _load_layers(model: nn.Module, layers: dict, state: dict[str, torch.Tensor], path) -> nn.Module:
    codecs = _codecs_for(layers)
    for name, info in layers.items():
        if codecs[name].unpack is not None:
            codecs[name].unpack(state, name, info)
    try:
        new = {
            name: _rebuild(get_module(model, name), info, state, name, codecs[name])
            for name, info in layers.items()
        }
    except AttributeError as err:
        raise ModelError(f"{path} does not fit {type(model).__name__}: {err}") from None
    _check_fits(model, new, state, path)  # before the model changes: never a half-loaded model
    for name, module in new.items():
        set_module(model, name, module)
    model.load_state_dict(state, strict=False)
    for module in new.values():
        module.refresh() if hasattr(module, "refresh") else None
    return model


def _check_fits(model: nn.Module, new: dict[str, nn.Module], state: dict[str, torch.Tensor], path) -> None:
    """The model's state dict once ``new`` replaces its layers must match ``state``'s keys and shapes."""
    own = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{n}.") for n in new)}
    for name, module in new.items():
        own.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    bad = sorted(set(state) ^ {k for k in own if not _tied_alias(k, own, state)})
    bad += [f"{k} (shape)" for k in state if k in own and own[k].shape != state[k].shape]
    if bad:
        raise ModelError(f"{path} does not fit {type(model).__name__}: mismatched keys {', '.join(bad[:5])}")


def _tied_alias(key: str, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    """A tied weight saved once under another name (see ``state_dict_for_saving``)."""
    if key in state:
        return False
    ptr = own[key].untyped_storage().data_ptr()
    return any(k in own and own[k].untyped_storage().data_ptr() == ptr for k in state)
