"""Which layer gets which config: pattern matching, done and checked before anything changes."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.errors import ConfigError, ModelError
from slimkit.quant.method import QuantMethod, method_for

EMBEDDING_CONFIG = "embedding_int8"


@dataclass
class Plan:
    layers: dict[str, Any] = field(default_factory=dict)  # module name -> layer config (or EMBEDDING_CONFIG)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it stays float
    analysis: dict | None = None  # mixed precision: the sensitivity analysis that chose the layers


def layer_method(cfg: Any) -> QuantMethod | None:
    """The method that quantizes a planned layer; None for embedding tables (int8 per row, any method)."""
    return None if cfg == EMBEDDING_CONFIG else method_for(cfg)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtypes(model: nn.Module, names: list[str]) -> None:
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"{name}: weight dtype {weight.dtype} cannot be quantized (float32/16 or bfloat16 only)"
            )


def _first_match(name: str, patterns: list[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def build_plan(model: nn.Module, config: Any) -> Plan:
    """Assign a config to each quantizable layer; raise naming any pattern that matches nothing."""
    plan = Plan()
    used: set[str] = set()
    default = method_for(config).layer_config(config)
    names = [n for n, _ in model.named_modules() if n]
    for pattern in [*config.include, *config.overrides]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            field_name = "include" if pattern in config.include else f"overrides.{pattern}"
            raise ConfigError(field_name, f"pattern {pattern!r} matches no module of {type(model).__name__}")
    _check_embedding_overrides(model, config)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            _plan_embedding(plan, name, config)
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        override = _first_match(name, list(config.overrides))
        chosen = default
        if override is not None:
            used.add(override)
            chosen = config.overrides[override]
            if chosen is None:
                plan.skipped[name] = f"override {override!r}: kept in float"
                continue
        elif not _first_match(name, config.include):
            continue
        reason = method_for(chosen).supports(chosen, module)
        if reason is None:
            plan.layers[name] = chosen
        else:
            plan.skipped[name] = reason
    if not any(v != EMBEDDING_CONFIG for v in plan.layers.values()):
        details = "; ".join(f"{k}: {v}" for k, v in list(plan.skipped.items())[:5])
        raise ModelError(
            f"{type(model).__name__} has no layer that {config.method} can quantize"
            + (f" ({details})" if details else " (no Linear or Conv2d layer matched include)")
        )
    _check_uniform(plan)
    _check_dtypes(model, list(plan.layers))
    return plan


def _plan_embedding(plan: Plan, name: str, config: Any) -> None:
    """With ``quantize_embeddings``, an included table becomes int8 unless an override keeps it float."""
    if not config.quantize_embeddings or not _first_match(name, config.include):
        return
    override = _first_match(name, list(config.overrides))
    if override is not None and config.overrides[override] is None:
        plan.skipped[name] = f"override {override!r}: kept in float"
    else:
        plan.layers[name] = EMBEDDING_CONFIG


def _check_embedding_overrides(model: nn.Module, config: Any) -> None:
    """An override giving a method to embedding tables only would be ignored: refuse it, naming it."""
    for pattern, value in config.overrides.items():
        hit = [m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)]
        layers = [m for m in hit if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
        if value is not None and layers and all(isinstance(m, nn.Embedding) for m in layers):
            raise ConfigError(
                f"overrides.{pattern}",
                "matches embedding tables only; they are quantized to int8 per row by "
                "quantize_embeddings: true, and an override can only keep them float (null)",
            )


def _check_uniform(plan: Plan) -> None:
    """Calibration-time and training-time methods cannot be mixed in one pass."""
    methods = {layer_method(c) for c in plan.layers.values()} - {None}
    trained = [m.name for m in methods if m.trains]
    if trained and len(methods) > 1:
        raise ConfigError(
            "overrides", f"{trained[0]} cannot be combined with post-training methods in one model"
        )


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
