"""Entry points: ``quantize_(model, config)`` or the explicit ``prepare_`` -> ``calibrate`` -> ``convert_``.

``prepare_`` validates the config against the model (patterns, layer types) and
attaches calibration collectors (or, for QAT, swaps in fake-quantized layers);
``calibrate`` runs batches through the model; ``convert_`` replaces the selected
layers by integer ones. Every check runs before the model is changed, so a bad
config, a pattern that matches nothing or a calibration batch of the wrong
shape raises an error naming it and leaves the model as it was.

Under ``torchrun`` each process calibrates on its own share of the batches and
``convert_`` first merges the collectors' statistics across the processes
(:mod:`slimkit.quant.distributed`: Hessians and activation sums summed, maxima
taken), so every process builds the layers that one process calibrated on all
the batches would build. Statistics that cannot be merged exactly (the
``moving_average`` and ``mse`` observers, ``mixed``'s analysis) are refused by
``prepare_``, before any batch runs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import slimkit.quant.methods  # noqa: F401  (registers the built-in methods)
from slimkit.batch import Forward, default_forward, describe_batch
from slimkit.calibration.collectors import all_reduce_collectors_, require_fed
from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.quant.base import as_config
from slimkit.quant.builders import build_layer
from slimkit.quant.distributed import calibration_env, check_mergeable
from slimkit.quant.fold import conv_bn_pairs, folded_conv
from slimkit.quant.method import method_for
from slimkit.quant.modules import FoldedBatchNorm
from slimkit.quant.plan import EMBEDDING_CONFIG, Plan, build_plan, get_module, layer_method, set_module
from slimkit.quant.summary import QuantSummary, kernels_of
from slimkit.utils.memory import release_free_memory

_STATE = "_slimkit_quant_state"


@dataclass
class _State:
    config: Any
    plan: Plan
    collectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    batches: list = field(default_factory=list)  # kept for mixed precision's sensitivity analysis
    forward: Forward | None = None
    example: Any = None  # the first calibration batch: traced to find BatchNorms to fold
    paused: bool = False  # collectors ignore forward passes that are not calibration


def is_prepared(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


def prepare_(model: nn.Module, config: Any) -> Plan:
    """Select layers and attach calibration collectors (QAT: swap in fake-quantized layers)."""
    config = as_config(config)
    if is_prepared(model):
        raise ModelError(f"{type(model).__name__} is already prepared for quantization: call convert_ first")
    plan = build_plan(model, config)
    state = _State(config, plan)
    for name, cfg in plan.layers.items():
        collectors = _collectors(get_module(model, name), cfg)
        if collectors:
            state.collectors[name] = collectors
    check_mergeable(config, state.collectors, calibration_env())
    for name, collectors in state.collectors.items():
        state.hooks.append(get_module(model, name).register_forward_pre_hook(_hook(collectors, state)))
    for name, cfg in plan.layers.items():
        method = layer_method(cfg)
        swapped = method.prepare_layer(cfg, get_module(model, name)) if method else None
        if swapped is not None:
            set_module(model, name, swapped)
    setattr(model, _STATE, state)
    return plan


def _collectors(module: nn.Module, cfg: Any) -> dict[str, Any]:
    method = layer_method(cfg)
    return method.collectors(cfg, module) if method else {}


def _hook(collectors: dict[str, Any], state: _State):
    def hook(module: nn.Module, args: tuple) -> None:
        if state.paused:
            return
        for collector in collectors.values():
            collector.update(args[0])

    return hook


def calibrate(
    model: nn.Module, batches: Iterable[Any], forward: Forward | None = None, max_batches: int | None = None
) -> int:
    """Run calibration batches (eval mode, no gradients). Returns the number of batches used."""
    state = _require_state(model)
    forward = forward or default_forward
    saved = copy.deepcopy(state.collectors)
    was_training, used, kept = model.training, 0, []
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                try:
                    forward(model, batch)
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    raise DataError(
                        f"calibration batch {i} ({_describe(batch)}) does not fit the model: {err}"
                    ) from err
                kept.append(batch)
                used += 1
    except BaseException:
        _restore_collectors(state, saved)
        raise
    finally:
        model.train(was_training)
    if used == 0:
        raise DataError("calibration: no batches were given")
    state.batches.extend(kept if method_for(state.config).keeps_batches else [])
    state.forward = forward
    state.example = kept[0] if state.example is None else state.example
    return used


def _restore_collectors(state: _State, saved: dict[str, dict[str, Any]]) -> None:
    # Hooks close over the collector dicts: refill those very dicts.
    for name, collectors in state.collectors.items():
        collectors.clear()
        collectors.update(saved[name])


_describe = describe_batch


def convert_(model: nn.Module) -> QuantSummary:
    """Replace the prepared layers by quantized ones; returns what was done (see :class:`QuantSummary`)."""
    state = _require_state(model)
    all_reduce_collectors_(state.collectors, calibration_env())  # under torchrun: all ranks' statistics
    plan = method_for(state.config).refine_plan(state.config, model, state)
    require_fed({n: c for n, c in state.collectors.items() if n in plan.layers}, " (run calibrate first)")
    folds = _batchnorm_folds(model, state, plan)
    source = {name: folds[name][0] if name in folds else get_module(model, name) for name in plan.layers}
    new = _build_all(plan, source, state.collectors)
    _detach(model, state)
    for name, module in new.items():
        set_module(model, name, module)
    for _, bn in folds.values():
        set_module(model, bn, FoldedBatchNorm())
    return QuantSummary(
        state.config.method,
        quantized={n: m.extra_repr() for n, m in new.items()},
        skipped=dict(plan.skipped),
        folded={bn: conv for conv, (_, bn) in folds.items()},
        analysis=plan.analysis,
        kernels=kernels_of(new.values()),
    )


def _build_all(plan: Plan, source: dict[str, nn.Module], collectors: dict) -> dict[str, nn.Module]:
    """Every planned layer's replacement (all built before any is swapped in: an error changes nothing)."""
    new = {}
    for i, (name, cfg) in enumerate(plan.layers.items()):
        new[name] = build_layer(source[name], cfg, collectors.get(name, {}))
        if i % 16 == 15:  # each build's float temporaries are freed, but glibc would keep them resident
            release_free_memory()
    return new


def _batchnorm_folds(model: nn.Module, state: _State, plan: Plan) -> dict[str, tuple[nn.Module, str]]:
    """``{conv: (folded copy, batchnorm name)}`` for the planned convs a BatchNorm alone reads.

    Only when the config's method folds (int8_static) and only for convs whose
    method builds from the folded float copy (int8, not QAT's trained layers).
    """
    if not (method_for(state.config).fold_batchnorm(state.config) and state.example is not None):
        return {}
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return {}
    state.paused = True  # the tracing pass must not count as calibration
    try:
        pairs = conv_bn_pairs(model, state.forward or default_forward, state.example)
    except Exception as err:  # an untraceable model still quantizes correctly, just without folding
        warnings.warn(
            f"BatchNorm folding skipped: the forward pass could not be traced ({err})", stacklevel=3
        )
        return {}
    finally:
        state.paused = False
    return {
        conv: (folded_conv(get_module(model, conv), get_module(model, bn)), bn)
        for conv, bn in pairs.items()
        if _takes_folded_conv(plan.layers.get(conv))
    }


def _takes_folded_conv(cfg: Any) -> bool:
    return cfg is not None and cfg != EMBEDDING_CONFIG and method_for(cfg).takes_folded_conv


def _detach(model: nn.Module, state: _State) -> None:
    for handle in state.hooks:
        handle.remove()
    setattr(model, _STATE, None)


def unprepare_(model: nn.Module) -> None:
    """Undo ``prepare_``: remove collectors and turn fake-quantized layers back into float ones."""
    state = _require_state(model)
    for name, cfg in state.plan.layers.items():
        method = layer_method(cfg)
        restored = method.unprepare_layer(cfg, get_module(model, name)) if method else None
        if restored is not None:
            set_module(model, name, restored)
    _detach(model, state)


def _require_state(model: nn.Module) -> _State:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ModelError(f"{type(model).__name__} is not prepared for quantization: call prepare_ first")
    return state


def quantize_(
    model: nn.Module,
    config: Any,
    calibration_data: Iterable[Any] | None = None,
    forward: Forward | None = None,
    max_batches: int | None = None,
) -> QuantSummary:
    """Quantize ``model`` in place in one call (QAT: only prepares; train, then ``convert_``)."""
    config = as_config(config)
    needs = [c.method for c in (config, *config.overrides.values()) if c is not None and c.needs_calibration]
    if needs and calibration_data is None:
        raise ConfigError("calibration_data", f"{needs[0]} needs calibration batches")
    method = method_for(config)
    if needs and not method.trains and method.calibrates_by_block(config, model):
        from slimkit.quant.sequential import quantize_by_block_

        if is_prepared(model):
            raise ModelError(
                f"{type(model).__name__} is already prepared for quantization: call convert_ first"
            )
        summary = quantize_by_block_(
            model, config, calibration_data, forward, max_batches, method.true_sequential(config)
        )
        summary.kernels = kernels_of(model.modules())
        return summary
    plan = prepare_(model, config)
    if method.trains:
        prepared = {n: f"prepared for training ({config.method})" for n in plan.layers}
        return QuantSummary(config.method, skipped=dict(plan.skipped), prepared=prepared)
    try:
        if needs:
            calibrate(model, calibration_data, forward, max_batches)
        return convert_(model)
    except BaseException:
        if is_prepared(model):
            unprepare_(model)
        raise
