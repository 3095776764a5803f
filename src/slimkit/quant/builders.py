"""Build a planned layer's quantized replacement, and the int8 pieces the methods share.

Each method's own building lives in its file (``slimkit/quant/methods/``);
:func:`build_layer` only dispatches through the method table, and the
helpers below are the weight quantization that several methods use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.quant.affine import QSpec, quantize, quantize_tensor
from slimkit.quant.collectors import ActivationSample, ChannelAbsMax
from slimkit.quant.method import method_for
from slimkit.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quant.observers import make_observer
from slimkit.quant.plan import EMBEDDING_CONFIG
from slimkit.quant.scale_search import row_relative_mse, search_scales
from slimkit.quant.smoothquant import smoothing_factors

INT8_ROWS = QSpec(8, True, "channel", 0)


def build_layer(module: nn.Module, cfg: Any, collectors: dict[str, Any]) -> nn.Module:
    """The quantized layer for ``module`` planned with ``cfg`` (a layer config or ``EMBEDDING_CONFIG``)."""
    if cfg == EMBEDDING_CONFIG:
        q, scale, _ = quantize_tensor(module.weight.detach().float(), INT8_ROWS)
        return QuantEmbedding.from_float(module, q, scale)
    return method_for(cfg).build(cfg, module, collectors)


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


def smoothquant_collectors(config: Any, module: nn.Module) -> dict[str, Any]:
    """SmoothQuant's per-input-channel |x| maximum (Linear layers; convs are not smoothed).

    With ``smoothquant_alpha: auto`` also a bounded sample of input rows, on which ``alpha`` is searched.
    """
    if not (config.smoothquant and isinstance(module, nn.Linear)):
        return {}
    out: dict[str, Any] = {"absmax": ChannelAbsMax(module.in_features)}
    if config.smoothquant_alpha == "auto":
        out["activations"] = ActivationSample(module.in_features, config.smoothquant_samples)
    return out


def smoothed_int8_weight(
    module: nn.Module, cfg: Any, collectors: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """int8 codes and scales of the weight, SmoothQuant-scaled if ``absmax`` was collected; ``1/s``; ``alpha``.

    ``alpha`` is the exponent used (searched with ``auto``), None where the layer is not smoothed.
    """
    w2d, in_scale, alpha = weight_2d(module), None, None
    if "absmax" in collectors:
        absmax = collectors["absmax"].value
        alpha = cfg.smoothquant_alpha
        if alpha == "auto":
            alpha = auto_smoothquant_alpha(w2d, absmax, collectors["activations"].sample(), cfg)[0]
        if alpha is not None:
            s = smoothing_factors(absmax, w2d, alpha)
            w2d, in_scale = w2d * s, 1.0 / s
    q, w_scale = int8_weight(w2d, cfg.weight_observer)
    return q, w_scale, in_scale, alpha


def w8a8_output(x: torch.Tensor, w2d: torch.Tensor, s: torch.Tensor | None, cfg: Any) -> torch.Tensor:
    """What the dynamic int8 Linear built with smoothing factors ``s`` computes on rows ``x`` (no bias).

    A real :class:`QuantLinear` (int8 per-channel codes of ``W * s``, input
    ``x * (1 / s)`` quantized per token or per tensor) runs it, so the search
    scores the runtime's own kernel, whichever this CPU dispatches to.
    """
    q, w_scale = int8_weight(w2d if s is None else w2d * s, cfg.weight_observer)
    layer = QuantLinear(w2d.shape[1], w2d.shape[0], "dynamic", cfg.activation_granularity)
    layer.set_weight(q, w_scale)
    layer.set_activation(None, None if s is None else 1.0 / s)
    return layer(x)


def auto_smoothquant_alpha(
    w2d: torch.Tensor, absmax: torch.Tensor, x: torch.Tensor, cfg: Any
) -> tuple[float | None, dict[float | None, float]]:
    """The ``alpha`` (None: no smoothing) whose W8A8 output on rows ``x`` is closest to the float one.

    Tried: no smoothing first (so a layer smoothing does not help stays as it
    was), then ``i / smoothquant_grid`` for ``i = 0 .. smoothquant_grid``.
    Returns it and each candidate's error (:func:`row_relative_mse`: every token counts alike).
    """
    grid = cfg.smoothquant_grid
    _, alpha, errors = search_scales(
        x,
        w2d,
        [None, *(i / grid for i in range(grid + 1))],
        lambda a: None if a is None else smoothing_factors(absmax, w2d, a),
        lambda s: w8a8_output(x, w2d, s, cfg),
        row_relative_mse,
    )
    return alpha, errors


def int8_layer(
    module: nn.Module,
    q: torch.Tensor,
    w_scale: torch.Tensor,
    mode: str,
    granularity: str,
    x_qparams: tuple | None = None,
    in_scale: torch.Tensor | None = None,
    smoothquant_alpha: float | None = None,
) -> nn.Module:
    """A :class:`QuantLinear` or :class:`QuantConv2d` in place of the float ``module``."""
    if isinstance(module, nn.Conv2d):
        mod = QuantConv2d(module, mode, granularity)
        mod.set_weight(q, w_scale)
        mod.set_activation(x_qparams)
        return mod
    mod = QuantLinear.from_float(module, q, w_scale, mode, granularity, x_qparams, in_scale)
    mod.smoothquant_alpha = smoothquant_alpha
    return mod
