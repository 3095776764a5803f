"""Structured pruning: physically remove channels, neurons and attention heads.

``prune_structured_`` traces the model once, builds coupled groups
(:mod:`slimkit.graph.groups`), scores their units with an importance
criterion, validates everything, and only then slices the weights of every
producer, follower and consumer through the slicer table
(:mod:`slimkit.prune.slicers`). The result is an ordinary ``nn.Module`` with
smaller ``Linear``/``Conv``/``BatchNorm`` layers (and updated head counts on
attention modules), so it runs through its normal forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from slimkit.batch import default_forward
from slimkit.errors import ConfigError, ModelError
from slimkit.graph.groups import Group, build_groups
from slimkit.graph.trace import trace_model
from slimkit.prune.attention import GQAttention, check_gqa, find_gqa, gqa_group, keep_units, set_head_counts_
from slimkit.prune.config import StructuredConfig
from slimkit.prune.hf_config import sync_config_
from slimkit.prune.importance import Importance, make_importance
from slimkit.prune.methods import register_method
from slimkit.prune.select import matches
from slimkit.prune.slicers import slice_layer_, slicer_for, update_head_counts_
from slimkit.prune.summary import PruneSummary, count_parameters

#: Group kinds counted as attention heads (ratio ``head_ratio``): traced heads, and GQA units.
HEAD_KINDS = ("head", "kv_group", "q_head")


def _selected(group: Group, config: StructuredConfig) -> bool:
    return any(matches(p, pat) for p in group.producers for pat in config.include) and not any(
        matches(p, pat) for p in group.producers for pat in config.exclude
    )


def _eligible(groups: list[Group], config: StructuredConfig) -> list[Group]:
    kinds = {"channel"} if config.prune_channels else set()
    kinds |= {"head"} if config.prune_heads else set()
    return [g for g in groups if g.prunable and g.kind in kinds and _selected(g, config)]


def _gqa_units(model: nn.Module, config: StructuredConfig) -> list[tuple[GQAttention, Group]]:
    """The selected GQA attentions with their units, checked (``gqa`` set), else nothing."""
    if config.gqa is None:
        return []
    found = [(a, gqa_group(a, config.gqa)) for a in find_gqa(model)]
    found = [(a, g) for a, g in found if _selected(g, config)]
    check_gqa([a for a, _ in found], config.gqa, {a.name: _ratio_for(g, config) for a, g in found})
    return found


def _check_patterns(
    model: nn.Module, groups: list[Group], chosen: list[Group], config: StructuredConfig
) -> None:
    """Every pattern must match a layer; explicit includes and ratios must reach a prunable one."""
    names = [n for n, _ in model.named_modules() if n]
    for field_name, patterns in (("include", config.include), ("exclude", config.exclude)):
        for i, pat in enumerate(patterns):
            if not any(matches(n, pat) for n in names):
                raise ConfigError(f"{field_name}[{i}]", f"pattern {pat!r} matches no layer")
    checks = [(f"include[{i}]", p) for i, p in enumerate(config.include) if p != "*"]
    checks += [(f"ratios.{p}", p) for p in config.ratios]
    for field_name, pat in checks:
        if any(matches(p, pat) for g in chosen for p in g.producers):
            continue
        hit = [n for n in names if matches(n, pat)]
        reasons = [
            f"{n}: {g.unsafe[0] if g.unsafe else 'excluded or a single unit'}"
            for g in groups
            for n in hit
            if n in g.producers
        ]
        why = (
            "; ".join(reasons[:3])
            or f"{', '.join(hit[:3])} ({_type_names(model, hit)}) cannot be pruned structurally"
        )
        raise ModelError(f"{field_name}: no layer matching {pat!r} can be pruned structurally: {why}")


def _type_names(model: nn.Module, names: list[str]) -> str:
    modules = dict(model.named_modules())
    return ", ".join(sorted({type(modules[n]).__name__ for n in names}))


def _ratio_for(group: Group, config: StructuredConfig) -> float:
    for pat, value in config.ratios.items():
        if any(matches(p, pat) for p in group.producers):
            return value
    return config.effective_head_ratio if group.kind in HEAD_KINDS else config.ratio


def _min_keep(group: Group, config: StructuredConfig) -> int:
    return min(group.units, config.min_heads if group.kind == "head" else config.min_width)


def _n_keep(group: Group, ratio: float, config: StructuredConfig) -> int:
    keep = max(group.units - math.floor(ratio * group.units + 1e-9), _min_keep(group, config))
    if config.round_to > 1 and group.kind == "channel":
        keep = min(group.units, math.ceil(keep / config.round_to) * config.round_to)
    return keep


def choose_units(
    groups: list[Group], scores: dict[str, torch.Tensor], config: StructuredConfig
) -> dict[str, list]:
    """``{group: sorted kept unit indices}``: per-group ratios, or one global ranking per kind."""
    keep = {}
    pooled = [
        g
        for g in groups
        if config.global_ranking and not any(matches(p, r) for p in g.producers for r in config.ratios)
    ]
    for g in groups:
        if g not in pooled:
            n = _n_keep(g, _ratio_for(g, config), config)
            keep[g.name] = sorted(torch.argsort(scores[g.name], descending=True, stable=True)[:n].tolist())
    for kind in ("channel", "head"):
        members = [g for g in pooled if g.kind == kind]
        if members:
            keep.update(_global_keep(members, scores, _ratio_for(members[0], config), config))
    return keep


def _global_keep(
    groups: list[Group], scores: dict[str, torch.Tensor], ratio: float, config
) -> dict[str, list]:
    """Remove the globally lowest units (scores normalised by their group's mean) down to the budget."""
    candidates = []
    for g in groups:
        s = scores[g.name].float()
        s = s / s.mean().clamp_min(1e-12)
        candidates += [(float(v), g.name, i) for i, v in enumerate(s)]
    candidates.sort()
    budget = math.floor(ratio * sum(g.units for g in groups) + 1e-9)
    kept = {g.name: set(range(g.units)) for g in groups}
    floor_of = {g.name: _min_keep(g, config) for g in groups}
    for _, name, i in candidates:
        if budget == 0:
            break
        if len(kept[name]) > floor_of[name]:
            kept[name].discard(i)
            budget -= 1
    return {n: sorted(k) for n, k in kept.items()}


def plan_slices(model: nn.Module, groups: list[Group], keep: dict[str, list]) -> dict[str, dict[int, set]]:
    """``{layer: {dim: positions to remove}}`` (dim 0 = outputs, 1 = inputs) for every touched layer."""
    plan: dict[str, dict[int, set]] = {}
    for g in groups:
        removed = torch.tensor(sorted(set(range(g.units)) - set(keep[g.name])), dtype=torch.long)
        if removed.numel() == 0:
            continue
        for name, span in g.producers.items():
            plan.setdefault(name, {}).setdefault(0, set()).update(span.positions(removed).tolist())
        for name, span in g.followers.items():
            plan.setdefault(name, {}).setdefault(0, set()).update(span.positions(removed).tolist())
        for name, span in g.consumers.items():
            plan.setdefault(name, {}).setdefault(1, set()).update(span.positions(removed).tolist())
    return plan


def _update_head_counts_(model: nn.Module, groups: list[Group], keep: dict[str, list]) -> None:
    modules = dict(model.named_modules())
    for g in groups:
        if g.kind == "head" and g.head_owner is not None:
            head_size = next(iter(g.producers.values())).block
            update_head_counts_(modules[g.head_owner], g.units, len(keep[g.name]), head_size)


class _CallWith(nn.Module):
    """Adapts ``forward(model, batch)`` to the ``model(input)`` call that ``count_macs`` makes."""

    def __init__(self, model: nn.Module, forward: Callable, batch: Any):
        super().__init__()
        self.model, self.call, self.batch = model, forward, batch

    def forward(self, _unused: torch.Tensor) -> Any:
        return self.call(self.model, self.batch)


def _macs(model: nn.Module, forward: Callable | None, example: Any) -> int | None:
    from slimkit.metrics import count_macs  # metrics imports more than pruning needs

    try:
        return count_macs(_CallWith(model, forward or default_forward, example), torch.zeros(1))
    except (RuntimeError, TypeError, ValueError):  # informational only: never fail pruning over it
        return None


def analyze(model: nn.Module, example: Any, forward: Callable | None = None) -> list[Group]:
    """The model's channel/head groups (prunable or not, with reasons); the model is unchanged."""
    return build_groups(model, trace_model(model, forward or default_forward, example))


def _criterion(
    config: StructuredConfig, importance: Importance | None, calibration: Any, loss_fn: Callable | None
) -> Importance:
    """The importance criterion to use, checked against the data it was given."""
    criterion = importance or make_importance(config.importance, config.seed, config.calibration_batches)
    what = repr(config.importance) if importance is None else type(importance).__name__
    if criterion.needs_calibration and calibration is None:
        raise ConfigError("importance", f"{what} needs calibration batches (calibration=...)")
    if criterion.needs_loss and loss_fn is None:
        raise ConfigError("importance", f"{what} needs loss_fn(model, batch) -> scalar loss")
    return criterion


def _slice_all_(model: nn.Module, plan: dict[str, dict[int, set]]) -> None:
    modules = dict(model.named_modules())
    for name in plan:  # every layer must have a slicer before the first one changes
        module = modules[name]
        slicer_for(module, name).sizes(module)
    with torch.no_grad():
        for name, remove in plan.items():
            slice_layer_(modules[name], remove, name)


@register_method(StructuredConfig)
def prune_structured_(
    model: nn.Module,
    config: StructuredConfig,
    calibration: Iterable | None = None,
    example_inputs: Any = None,
    forward: Callable | None = None,
    loss_fn: Callable | None = None,
    importance: Importance | None = None,
) -> PruneSummary:
    """Remove units in place; everything is validated and scored before the first weight changes.

    ``calibration``: batches for data-driven importance (and the trace example
    if ``example_inputs`` is not given). ``forward(model, batch)`` runs a batch
    (default: dict -> ``model(**batch)``, tuple -> ``model(batch[0])``).
    ``loss_fn(model, batch) -> scalar`` is needed by the Taylor criterion.
    ``importance`` overrides ``config.importance`` with a custom criterion.
    """
    criterion = _criterion(config, importance, calibration, loss_fn)
    calibration = list(calibration) if calibration is not None else None
    example = example_inputs if example_inputs is not None else (calibration[0] if calibration else None)
    if example is None:
        raise ConfigError("example_inputs", "structured pruning needs example_inputs or calibration to trace")
    groups = analyze(model, example, forward)
    attention = _gqa_units(model, config)
    chosen = _eligible(groups, config)
    _check_patterns(model, groups, chosen + [g for _, g in attention], config)
    criterion.prepare(
        model, chosen + [g for _, g in attention], calibration, forward or default_forward, loss_fn
    )
    keep = choose_units(chosen, {g.name: criterion.score(model, g) for g in chosen}, config)
    for att, g in attention:
        keep[g.name] = keep_units(att, config.gqa, criterion.score(model, g), _ratio_for(g, config))
    plan = plan_slices(model, chosen + [g for _, g in attention], keep)
    summary = PruneSummary(method="structured", params_before=count_parameters(model))
    summary.macs_before = _macs(model, forward, example)
    _slice_all_(model, plan)
    _update_head_counts_(model, chosen, keep)
    for att, g in attention:
        set_head_counts_(att, config.gqa, len(keep[g.name]))
    summary.config, summary.non_uniform = sync_config_(model)
    chosen += [g for _, g in attention]
    summary.params_after = count_parameters(model)
    summary.macs_after = _macs(model, forward, example)
    return _list_groups(summary, groups, chosen, keep)


def _list_groups(summary: PruneSummary, groups: list[Group], chosen: list[Group], keep: dict) -> PruneSummary:
    """The pruned groups, and the ones skipped with why (a GQA attention pruned by role is not skipped)."""
    done = {p for g in chosen for p in g.producers}
    summary.groups = [
        {"name": g.name, "kind": g.kind, "before": g.units, "after": len(keep[g.name])} for g in chosen
    ]
    summary.skipped = [
        {"name": g.name, "kind": g.kind, "reason": "; ".join(g.unsafe[:2])}
        for g in groups
        if not g.prunable and not done & set(g.producers)
    ]
    return summary
