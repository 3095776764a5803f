"""codebook: weight sharing (Han et al. 2016): per-layer k-means codebooks of 2**bits values, b-bit indices.

``prepare_`` clusters each selected Linear/Conv2d (:func:`slimkit.quant.codebook.cluster`;
only non-zeros when the layer is pruned) and swaps in a layer whose codebook is
a Parameter; training the model then fine-tunes the shared values (each
centroid receives the summed gradient of its weights, the indices stay fixed);
``convert_`` freezes the codebook. Like qat it trains: ``quantize_`` only
prepares, and the recipe step trains (``train:``, default 1 epoch) before it
converts. ``levels: log | pow2`` are the non-uniform scalar quantizers (fixed
sign-symmetric levels instead of k-means; pow2 levels stay powers of two: not trained).
``activation_bits: 8`` makes ``convert_`` quantize each codebook to int8 (one symmetric
scale per layer, so the table stays shared) and the frozen layers run slimkit's
dynamic int8 GEMM with activations per tensor; fine-tuning before it stays float.

Saved by :func:`~slimkit.quant.save_quantized` (safetensors) or, entropy-coded,
by :func:`~slimkit.quant.save_compressed`: the indices of the non-zero weights
(``codes``) and, for a pruned layer, their positions as relative gaps in LEB128
varints (``gaps``), so that the coders see two small-alphabet byte streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.config import one_of, positive_int, require
from slimkit.errors import ModelError
from slimkit.quant.base import QuantConfig
from slimkit.quant.codebook import CodebookConv2d, CodebookLinear, SharedWeights, cluster, to_float
from slimkit.quant.codecs import Info, LayerCodec, State
from slimkit.quant.method import QuantMethod, register_method
from slimkit.utils.entropy import (
    CodingError,
    gaps_to_positions,
    positions_to_gaps,
    varint_decode,
    varint_encode,
)

LEVELS = ("kmeans", "log", "pow2")


@dataclass
class CodebookConfig(QuantConfig):
    """Shared weights: ``2**bits`` values per layer (k-means, or fixed log / power-of-two levels)."""

    bits: int = 5
    levels: str = "kmeans"
    init: str = "linear"  # k-means start: linear over [min, max] (Han et al.'s best) or density (quantiles)
    iterations: int = 100
    activation_bits: int | None = None  # 8: int8 codebook and int8 activations once converted

    def __post_init__(self):
        super().__post_init__()
        require(
            isinstance(self.bits, int) and not isinstance(self.bits, bool) and 2 <= self.bits <= 8,
            "bits",
            f"must be an integer from 2 to 8 (a codebook of 2**bits = 4..256 shared values), got {self.bits!r}",
        )
        one_of(self.levels, "levels", LEVELS)
        one_of(self.init, "init", ("linear", "density"))
        positive_int(self.iterations, "iterations")
        require(
            self.activation_bits is None or (type(self.activation_bits) is int and self.activation_bits == 8),
            "activation_bits",
            f"must be 8 (int8 activations) or null (float compute), got {self.activation_bits!r}",
        )


def _layer(config: CodebookConfig, module: nn.Module, trainable: bool) -> SharedWeights:
    shared = cluster(module.weight, config.bits, config.levels, config.init, config.iterations)
    cls = CodebookConv2d if isinstance(module, nn.Conv2d) else CodebookLinear
    return cls.from_float(module, shared, trainable).to(module.weight.device)


def _describe(module: SharedWeights) -> Info:
    int8 = {} if module.activation_bits is None else {"activation_bits": module.activation_bits}
    return {"bits": module.bits, "sparse": module.mask is not None, **int8}


def _pack(state: State, name: str, info: Info) -> None:
    """``indices`` (+ ``mask``) -> ``codes`` of the kept weights (+ their ``gaps``, LEB128 bytes)."""
    indices = state.pop(f"{name}.indices")
    mask = state.pop(f"{name}.mask", None)
    info["shape"] = list(indices.shape)
    flat = indices.reshape(-1)
    if mask is None:
        state[f"{name}.codes"] = flat.clone()
        return
    positions = torch.nonzero(mask.reshape(-1)).flatten()
    state[f"{name}.codes"] = flat[positions].clone()
    state[f"{name}.gaps"] = torch.from_numpy(varint_encode(positions_to_gaps(positions.numpy())))


def _unpack(state: State, name: str, info: Info) -> None:
    shape = info.get("shape")
    codes = state.pop(f"{name}.codes", None)
    if not isinstance(shape, list) or codes is None:
        raise ModelError(f"{name}: codebook layer without its shape or codes")
    numel = int(np.prod(shape, dtype=np.int64))
    flat = torch.zeros(numel, dtype=torch.uint8)
    if not info.get("sparse"):
        if codes.numel() != numel:
            raise ModelError(f"{name}: {codes.numel()} codes for a weight of {numel}")
        state[f"{name}.indices"] = codes.reshape(shape).to(torch.uint8)
        return
    try:
        positions = gaps_to_positions(varint_decode(state.pop(f"{name}.gaps").numpy()))
    except (KeyError, CodingError) as err:
        raise ModelError(f"{name}: sparse positions unreadable ({err})") from None
    if positions.size != codes.numel() or (positions.size and positions[-1] >= numel):
        raise ModelError(
            f"{name}: {positions.size} positions for {codes.numel()} codes in a weight of {numel}"
        )
    where = torch.from_numpy(positions)
    flat[where] = codes.to(torch.uint8)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[where] = True
    state[f"{name}.indices"], state[f"{name}.mask"] = flat.reshape(shape), mask.reshape(shape)


def _rebuild(float_module: nn.Module, info: Info) -> nn.Module:
    """An empty shared layer of the stored shape (``load_state_dict`` fills it)."""
    shape = tuple(info["shape"])
    empty = (
        torch.zeros(2 ** info["bits"]),
        torch.zeros(shape, dtype=torch.uint8),
        torch.zeros(shape, dtype=torch.bool) if info.get("sparse") else None,
    )
    if isinstance(float_module, nn.Conv2d):
        layer = CodebookConv2d(float_module, *empty, bias=float_module.bias)
    else:
        layer = CodebookLinear(
            float_module.in_features, float_module.out_features, *empty, bias=float_module.bias
        )
    if info.get("activation_bits") is not None:
        if info["activation_bits"] != 8:
            raise ModelError(
                f"codebook layer with activation_bits {info['activation_bits']!r} (only 8 is known)"
            )
        layer.activation_bits, layer.w_scale = 8, torch.ones(())  # the stored scale replaces it
    return layer


_CODECS = (
    LayerCodec(CodebookLinear, _rebuild, _describe, _pack, _unpack),
    LayerCodec(CodebookConv2d, _rebuild, _describe, _pack, _unpack),
)


class Codebook(QuantMethod):
    name = "codebook"
    config_type = CodebookConfig
    layer_types = (nn.Linear, nn.Conv2d)
    codecs = _CODECS
    trains = True

    def prepare_layer(self, config: CodebookConfig, module: nn.Module) -> nn.Module:
        # pow2 levels stay powers of two (their point: multiplications become shifts), so they are not trained.
        return _layer(config, module, trainable=config.levels != "pow2")

    def unprepare_layer(self, config: CodebookConfig, module: nn.Module) -> nn.Module | None:
        return to_float(module) if isinstance(module, SharedWeights) else None

    def build(self, config: CodebookConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        """The fine-tuned shared layer, frozen (a float layer is clustered first)."""
        shared = module if isinstance(module, SharedWeights) else _layer(config, module, trainable=False)
        shared.freeze_()
        return shared if config.activation_bits is None else shared.int8_activations_()

    def weight_bytes(self, config: CodebookConfig, module: nn.Module) -> float:
        scale = 0.0 if config.activation_bits is None else 4.0
        return module.weight.numel() * config.bits / 8 + 4.0 * 2**config.bits + scale


METHOD = register_method(Codebook())
