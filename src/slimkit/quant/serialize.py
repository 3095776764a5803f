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
from slimkit.quant.affine import pack_int4, unpack_int4
from slimkit.quant.modules import (
    BF16Linear,
    FoldedBatchNorm,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    WeightOnlyLinear,
)
from slimkit.quant.plan import get_module, set_module
from slimkit.utils.io import load_weights_file, save_weights, state_dict_for_saving

META_KEY = "slimkit_quant"
QUANT_TYPES = (QuantLinear, QuantConv2d, WeightOnlyLinear, QuantEmbedding, BF16Linear, FoldedBatchNorm)


def describe(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, QuantLinear):
        return {
            "class": "QuantLinear",
            "in": module.in_features,
            "out": module.out_features,
            "mode": module.mode,
            "granularity": module.granularity,
            "weight_bits": module.weight_bits,
        }
    if isinstance(module, QuantConv2d):
        return {
            "class": "QuantConv2d",
            "mode": module.mode,
            "granularity": module.granularity,
            "weight_bits": module.weight_bits,
        }
    if isinstance(module, WeightOnlyLinear):
        return {
            "class": "WeightOnlyLinear",
            "in": module.in_features,
            "out": module.out_features,
            "bits": module.bits,
            "group_size": module.group_size,
        }
    if isinstance(module, QuantEmbedding):
        return {"class": "QuantEmbedding"}
    if isinstance(module, FoldedBatchNorm):
        return {"class": "FoldedBatchNorm"}
    return {"class": "BF16Linear"}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` (after ``convert_``) to ``path`` (.safetensors); returns the file size in bytes."""
    layers = {n: describe(m) for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}
    if all(info["class"] == "FoldedBatchNorm" for info in layers.values()):
        raise ModelError(f"{type(model).__name__} has no quantized layer to save (run quantize_ first)")
    state = state_dict_for_saving(model)
    for name, info in layers.items():
        if info.get("weight_bits") == 4:
            codes = state.pop(f"{name}.qweight")
            info["shape"] = list(codes.shape)
            flat = codes.reshape(-1)
            if flat.numel() % 2:  # two codes per byte: pad an odd count with one zero code
                flat = torch.cat([flat, flat.new_zeros(1)])
            state[f"{name}.qweight_int4"] = pack_int4(flat).contiguous()
    return save_weights(state, path, metadata={META_KEY: json.dumps(layers)})


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
    float_module: nn.Module, info: dict[str, Any], state: dict[str, torch.Tensor], name: str
) -> nn.Module:
    kind = info["class"]
    if kind == "QuantLinear":
        mod = QuantLinear(info["in"], info["out"], info["mode"], info["granularity"])
        mod.weight_bits = info["weight_bits"]
    elif kind == "QuantConv2d":
        mod = QuantConv2d(float_module, info["mode"], info["granularity"])
        mod.weight_bits = info["weight_bits"]
    elif kind == "WeightOnlyLinear":
        mod = WeightOnlyLinear(info["in"], info["out"], info["bits"], info["group_size"])
    elif kind == "QuantEmbedding":
        mod = QuantEmbedding(
            float_module.num_embeddings, float_module.embedding_dim, float_module.padding_idx
        )
    elif kind == "BF16Linear":
        mod = BF16Linear.from_float(float_module)
    elif kind == "FoldedBatchNorm":
        mod = FoldedBatchNorm()
    else:
        raise ModelError(f"{name}: unknown quantized layer class {kind!r}")
    for buffer in ("bias_value", "in_scale"):
        if f"{name}.{buffer}" in state and getattr(mod, buffer, None) is None:
            mod.register_buffer(buffer, torch.zeros_like(state[f"{name}.{buffer}"]))
    return mod


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized layers recorded in ``path`` on ``model`` (float, same architecture) and load."""
    layers = read_layers(path)
    state = load_weights_file(path)
    for name, info in layers.items():
        if info.get("weight_bits") == 4 and f"{name}.qweight_int4" in state:
            shape = info["shape"]
            codes = unpack_int4(state.pop(f"{name}.qweight_int4"))
            state[f"{name}.qweight"] = codes[: shape[0] * shape[1]].reshape(shape)
    try:
        new = {name: _rebuild(get_module(model, name), info, state, name) for name, info in layers.items()}
    except AttributeError as err:
        raise ModelError(f"{path} does not fit {type(model).__name__}: {err}") from None
    for name, module in new.items():
        set_module(model, name, module)
    own = model.state_dict()
    bad = sorted(set(state) ^ {k for k in own if not _tied_alias(k, own, state)})
    if bad:
        raise ModelError(f"{path} does not fit {type(model).__name__}: mismatched keys {', '.join(bad[:5])}")
    model.load_state_dict(state, strict=False)
    for module in new.values():
        module.refresh() if hasattr(module, "refresh") else None
    return model


def _tied_alias(key: str, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    """A tied weight saved once under another name (see ``state_dict_for_saving``)."""
    if key in state:
        return False
    ptr = own[key].untyped_storage().data_ptr()
    return any(k in own and own[k].untyped_storage().data_ptr() == ptr for k in state)
