"""Mixed precision: per-layer sensitivity analysis and the policy that keeps sensitive layers precise.

Sensitivity of a layer = relative output error ``||y_q - y||^2 / ||y||^2`` of
the whole model on the calibration batches when that layer alone is quantized
(with the same integer modules that inference uses). The policy then keeps the
most sensitive layers in ``high`` precision (float by default), adding them one
by one in order of sensitivity until the budgets hold: at most
``max_high_layers``, an estimated weight size within ``max_size_mb``, and a
measured relative output error within ``max_error``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.batch import first_output
from slimkit.metrics.modes import eval_mode
from slimkit.quant.builders import build_layer
from slimkit.quant.method import method_for
from slimkit.quant.plan import EMBEDDING_CONFIG, Plan, get_module, set_module


def _outputs(model: nn.Module, batches: list, forward) -> list[torch.Tensor]:
    # eval_mode restores every submodule's own flag: model.train(was) would flip a BatchNorm
    # that the caller had put in eval mode back to training.
    with eval_mode(model), torch.no_grad():
        return [first_output(forward(model, b)).detach().float().clone() for b in batches]


def relative_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    num = sum(float((o - r).pow(2).sum()) for r, o in zip(reference, outputs))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return num / max(den, 1e-30)


def _swap_in(model: nn.Module, names: list[str], plan: Plan, collectors: dict) -> dict[str, nn.Module]:
    """Quantize ``names`` in place; returns the float originals so that they can be put back."""
    originals = {}
    for name in names:
        originals[name] = get_module(model, name)
        set_module(model, name, build_layer(originals[name], plan.layers[name], collectors.get(name, {})))
    return originals


def _restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        set_module(model, name, module)


def layer_sensitivity(
    model: nn.Module, plan: Plan, collectors: dict, batches: list, forward
) -> dict[str, float]:
    """Relative output error with each planned layer quantized alone (model restored after each)."""
    reference = _outputs(model, batches, forward)
    result = {}
    for name in plan.layers:
        originals = _swap_in(model, [name], plan, collectors)
        try:
            result[name] = relative_error(reference, _outputs(model, batches, forward))
        finally:
            _restore(model, originals)
    return result


def _bytes(module: nn.Module, cfg: Any) -> float:
    n = module.weight.numel()
    if cfg is None:
        return 4.0 * n
    if cfg == EMBEDDING_CONFIG:
        return n + 4.0 * module.weight.shape[0]
    return method_for(cfg).weight_bytes(cfg, module)


def estimate_size_mb(model: nn.Module, layers: dict[str, Any]) -> float:
    """Weights of ``layers`` at their configured width (None: float) plus every other tensor in float."""
    quantized = {f"{name}.weight" for name in layers}
    rest = sum(4.0 * t.numel() for k, t in model.state_dict().items() if k not in quantized)
    return (rest + sum(_bytes(get_module(model, n), c) for n, c in layers.items())) / 1e6


def choose_high_layers(model, plan, collectors, batches, forward, config: Any, sens) -> dict:
    """``config``: the MixedPrecisionConfig (``high`` and the budgets)."""
    order = sorted((n for n in sens), key=lambda n: -sens[n])
    cap = len(order) if config.max_high_layers is None else min(config.max_high_layers, len(order))
    reference = _outputs(model, batches, forward) if config.max_error is not None else None
    high: list[str] = []
    trace = []
    for k in range(cap + 1):
        high = order[:k]
        layers = {n: (config.high if n in high else c) for n, c in plan.layers.items()}
        size = estimate_size_mb(model, layers)
        error = None
        if reference is not None:
            originals = _swap_in(model, [n for n in plan.layers if n not in high], plan, collectors)
            try:
                error = relative_error(reference, _outputs(model, batches, forward))
            finally:
                _restore(model, originals)
        trace.append({"high_layers": k, "size_mb": size, "error": error})
        if config.max_size_mb is not None and size > config.max_size_mb:
            high = order[: max(k - 1, 0)]  # the last one kept did not fit
            break
        if error is not None and error <= config.max_error:
            break
    return {"order": order, "high": high, "trace": trace}


def mixed_precision_plan(model: nn.Module, config: Any, state: Any) -> Plan:
    """The plan after the sensitivity analysis of the prepared ``state``; the analysis is in ``plan.analysis``."""
    if not state.batches:
        raise ValueError("mixed precision needs calibration batches: run calibrate first")
    plan, forward = state.plan, state.forward
    candidates = Plan({n: c for n, c in plan.layers.items() if c != EMBEDDING_CONFIG}, dict(plan.skipped))
    sens = layer_sensitivity(model, candidates, state.collectors, state.batches, forward)
    choice = choose_high_layers(model, plan, state.collectors, state.batches, forward, config, sens)
    layers, skipped = {}, dict(plan.skipped)
    for name, cfg in plan.layers.items():
        if name not in choice["high"]:
            layers[name] = cfg
        elif config.high is not None:
            layers[name] = config.high
        else:
            skipped[name] = f"mixed precision: kept in float (sensitivity {sens[name]:.3g})"
    return Plan(layers, skipped, analysis={"sensitivity": sens, **choice})


def plot_sensitivity(
    analysis: dict, path: str | os.PathLike, title: str = "Per-layer quantization sensitivity"
) -> Path:
    """Bar plot of each layer's relative output error (log scale), most sensitive first."""
    from slimkit.report.plots import plot_series

    order = analysis["order"]
    values = [analysis["sensitivity"][n] for n in order]
    high = set(analysis["high"])
    series = {
        "kept in high precision": (order, [v if n in high else 0.0 for n, v in zip(order, values)]),
        "quantized": (order, [0.0 if n in high else v for n, v in zip(order, values)]),
    }
    return plot_series(path, title, "layer", "relative output error", series, kind="bar", logy=True)
