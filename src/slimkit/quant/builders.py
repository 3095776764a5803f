"""Turn one float layer plus its calibration statistics into its quantized replacement."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.quant.affine import QSpec, quantize, quantize_tensor
from slimkit.quant.config import (
    BF16Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    WeightOnlyConfig,
)
from slimkit.quant.gptq import gptq_quantize
from slimkit.quant.modules import BF16Linear, QuantConv2d, QuantEmbedding, QuantLinear, WeightOnlyLinear
from slimkit.quant.observers import make_observer
from slimkit.quant.plan import EMBEDDING_CONFIG
from slimkit.quant.qat import QATConv2d, QATLinear
from slimkit.quant.smoothquant import smoothing_factors

INT8_ROWS = QSpec(8, True, "channel", 0)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a conv's kernel flattened the way ``F.unfold`` orders inputs)."""
    w = module.weight.detach().float()
    return w.reshape(w.shape[0], -1)


def int8_weight(w2d: torch.Tensor, observer: str, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    spec = QSpec(bits, True, "channel", 0)
    obs = make_observer(observer, spec)
    obs.update(w2d)
    scale, zero = obs.qparams()
    return quantize(w2d, scale, zero, spec), scale


def build(module: nn.Module, cfg: Any, collectors: dict[str, Any]) -> nn.Module:
    if cfg == EMBEDDING_CONFIG:
        q, scale, _ = quantize_tensor(module.weight.detach().float(), INT8_ROWS)
        return QuantEmbedding.from_float(module, q, scale)
    if isinstance(module, (QATLinear, QATConv2d)):
        return _from_qat(module)
    if isinstance(cfg, BF16Config):
        return BF16Linear.from_float(module)
    if isinstance(cfg, WeightOnlyConfig):
        return _weight_only(module, cfg, collectors)
    if isinstance(cfg, (Int8DynamicConfig, Int8StaticConfig)):
        return _int8(module, cfg, collectors)
    raise TypeError(f"no builder for {type(cfg).__name__} on {type(module).__name__}")


def _int8(module: nn.Module, cfg: Any, collectors: dict[str, Any]) -> nn.Module:
    w2d, in_scale, x_qparams = weight_2d(module), None, None
    if "absmax" in collectors:
        s = smoothing_factors(collectors["absmax"].value, w2d, cfg.smoothquant_alpha)
        w2d, in_scale = w2d * s, 1.0 / s
    q, w_scale = int8_weight(w2d, cfg.weight_observer)
    if isinstance(cfg, Int8StaticConfig):
        x_qparams = _static_act_qparams(cfg, collectors, in_scale)
    mode = "static" if isinstance(cfg, Int8StaticConfig) else "dynamic"
    granularity = getattr(cfg, "activation_granularity", "tensor")
    if isinstance(module, nn.Conv2d):
        mod = QuantConv2d(module, mode, "tensor" if mode == "static" else granularity)
        mod.set_weight(q, w_scale)
        mod.set_activation(x_qparams)
        return mod
    return QuantLinear.from_float(module, q, w_scale, mode, granularity, x_qparams, in_scale)


def _static_act_qparams(cfg: Int8StaticConfig, collectors: dict[str, Any], in_scale) -> tuple:
    spec = QSpec(8, cfg.activation_symmetric, "tensor")
    if "act_channels" in collectors:
        lo, hi = collectors["act_channels"].range()
        # Dividing channel j by s_j > 0 scales its range by in_scale_j; the tensor range is the extreme.
        obs = make_observer("minmax", spec)
        obs.lo, obs.hi = (lo * in_scale).min(), (hi * in_scale).max()
        return obs.qparams()
    return collectors["act"].qparams()


def _weight_only(module: nn.Linear, cfg: WeightOnlyConfig, collectors: dict[str, Any]) -> nn.Module:
    w2d = weight_2d(module)
    if cfg.bits == 8:
        spec = QSpec(8, True, "channel", 0)
    else:
        spec = QSpec(4, cfg.symmetric, "group", 0, cfg.group_size)
    if "hessian" in collectors:
        q, scale, zero = gptq_quantize(w2d, collectors["hessian"].h, spec, cfg.damp, cfg.block_size)
    else:
        q, scale, zero = quantize_tensor(w2d, spec)
    return WeightOnlyLinear.from_float(module, q, scale, zero, cfg.bits, cfg.group_size)


def _from_qat(module: QATLinear | QATConv2d) -> nn.Module:
    """Integer layer with exactly the grid the network was trained on."""
    w2d = weight_2d(module)
    spec = module.weight_spec
    w_spec = QSpec(spec.bits, True, spec.granularity, 0)
    q, scale, _ = quantize_tensor(w2d, w_spec)
    scale = scale.expand(w2d.shape[0]) if w_spec.granularity == "tensor" else scale
    observer = module.act_observer
    mode = "static" if observer is not None and observer.lo is not None else "dynamic"
    x_qparams = observer.qparams() if mode == "static" else None
    if isinstance(module, nn.Conv2d):
        mod = QuantConv2d(module, mode, "tensor")
    else:
        mod = QuantLinear(module.in_features, module.out_features, mode, "token")
        mod._set_bias(module.bias)
    mod.set_weight(q, scale)
    mod.set_activation(x_qparams)
    mod.weight_bits = spec.bits
    return mod


def qat_to_float(module: QATLinear | QATConv2d) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        new = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            device="meta",
        )
    else:
        new = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
    new.weight, new.bias = module.weight, module.bias
    new.train(module.training)
    return new
