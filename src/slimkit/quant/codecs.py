"""How each quantized layer class is written to a safetensors file and rebuilt from it.

A :class:`LayerCodec` per layer class: ``describe`` gives the JSON that
:func:`~slimkit.quant.serialize.save_quantized` stores beside the tensors (the
``class`` key is added from the codec's name), ``rebuild`` makes an empty layer
of the right shape from the float layer it replaces and that JSON, and
``pack``/``unpack`` may rewrite the layer's tensors for the file. Methods list
the codecs of the layers they build (``QuantMethod.codecs``); the layers every
method may produce (int8 embedding tables, folded BatchNorms) are here in
:data:`BASE_CODECS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.quant.affine import pack_int4, unpack_int4
from slimkit.quant.modules import FoldedBatchNorm, QuantConv2d, QuantEmbedding, QuantLinear

Info = dict[str, Any]
State = dict[str, torch.Tensor]


def _nothing(module: nn.Module) -> Info:
    return {}


@dataclass(frozen=True)
class LayerCodec:
    cls: type[nn.Module]
    rebuild: Callable[[nn.Module, Info], nn.Module]  # (float layer it replaces, describe()'s JSON)
    describe: Callable[[nn.Module], Info] = _nothing
    pack: Callable[[State, str, Info], None] | None = None  # (state dict, layer name, JSON), in place
    unpack: Callable[[State, str, Info], None] | None = None

    @property
    def name(self) -> str:
        """The ``class`` written to the file (the class name: files stay readable across versions)."""
        return self.cls.__name__


def _describe_int8(module: QuantLinear | QuantConv2d) -> Info:
    shape = {"in": module.in_features, "out": module.out_features} if isinstance(module, QuantLinear) else {}
    alpha = getattr(module, "smoothquant_alpha", None)
    return {
        **shape,
        "mode": module.mode,
        "granularity": module.granularity,
        "weight_bits": module.weight_bits,
        **({} if alpha is None else {"smoothquant_alpha": alpha}),  # kept for the layer's description
    }


def _pack_int4_codes(state: State, name: str, info: Info) -> None:
    """4-bit codes (QAT at 4 bits) go to the file two per byte."""
    if info.get("weight_bits") != 4:
        return
    codes = state.pop(f"{name}.qweight")
    info["shape"] = list(codes.shape)
    flat = codes.reshape(-1)
    if flat.numel() % 2:  # two codes per byte: pad an odd count with one zero code
        flat = torch.cat([flat, flat.new_zeros(1)])
    state[f"{name}.qweight_int4"] = pack_int4(flat).contiguous()


def _unpack_int4_codes(state: State, name: str, info: Info) -> None:
    if info.get("weight_bits") == 4 and f"{name}.qweight_int4" in state:
        shape = info["shape"]
        codes = unpack_int4(state.pop(f"{name}.qweight_int4"))
        state[f"{name}.qweight"] = codes[: shape[0] * shape[1]].reshape(shape)


def _rebuild_linear(float_module: nn.Module, info: Info) -> nn.Module:
    mod = QuantLinear(info["in"], info["out"], info["mode"], info["granularity"])
    mod.weight_bits = info["weight_bits"]
    mod.smoothquant_alpha = info.get("smoothquant_alpha")
    return mod


def _rebuild_conv(float_module: nn.Module, info: Info) -> nn.Module:
    mod = QuantConv2d(float_module, info["mode"], info["granularity"])
    mod.weight_bits = info["weight_bits"]
    return mod


def _rebuild_embedding(float_module: nn.Module, info: Info) -> nn.Module:
    return QuantEmbedding(float_module.num_embeddings, float_module.embedding_dim, float_module.padding_idx)


# The int8 x int8 layers: built by int8_dynamic, int8_static and qat alike.
INT8_CODECS = (
    LayerCodec(QuantLinear, _rebuild_linear, _describe_int8, _pack_int4_codes, _unpack_int4_codes),
    LayerCodec(QuantConv2d, _rebuild_conv, _describe_int8, _pack_int4_codes, _unpack_int4_codes),
)
BASE_CODECS = (
    LayerCodec(QuantEmbedding, _rebuild_embedding),
    LayerCodec(FoldedBatchNorm, lambda float_module, info: FoldedBatchNorm()),
)
