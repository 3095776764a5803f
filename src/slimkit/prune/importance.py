"""Importance criteria: one score per unit (channel, neuron or head) of a prunable group.

Every criterion has the same interface: ``prepare(model, groups, calibration,
forward, loss_fn)`` once (a calibration pass if it needs one), then
``score(model, group) -> tensor[units]``; lower means removed first.

Criteria are named in one registry, :data:`IMPORTANCES`, filled by
:func:`register_importance`; ``StructuredConfig.importance`` is validated
against it and :func:`make_importance` builds from it, so a custom criterion
is one decorated :class:`Importance` subclass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from slimkit.batch import default_forward
from slimkit.errors import ConfigError
from slimkit.graph.groups import Group
from slimkit.graph.propagate import Span


def unit_view(tensor: torch.Tensor, dim: int, span: Span, units: int) -> torch.Tensor:
    """``tensor``'s slices belonging to each unit along ``dim``, as a ``(units, -1)`` matrix."""
    pos = span.positions(torch.arange(units)).to(tensor.device)
    picked = tensor.index_select(dim, pos).movedim(dim, 0)
    return picked.reshape(units, span.block, -1).reshape(units, -1)


def group_tensors(model: nn.Module, group: Group, grads: bool = False) -> list[torch.Tensor]:
    """Per-unit ``(units, -1)`` views of every parameter (or gradient) the group's units own."""
    modules = dict(model.named_modules())
    out = []

    def pick(p, dim, span):
        t = p.grad if grads else p.detach()
        if t is not None:
            out.append(unit_view(t, dim, span, group.units))

    for name, span in group.producers.items():
        m = modules[name]
        pick(m.weight, 0, span)
        if m.bias is not None:
            pick(m.bias, 0, span)
    for name, span in group.followers.items():
        for p in modules[name]._parameters.values():
            if p is not None:
                pick(p, 0, span)
    for name, span in group.consumers.items():
        pick(modules[name].weight, 1, span)
    return out


class Importance:
    """Base class; subclasses implement :meth:`score` (and :meth:`prepare` if they need data).

    Every criterion is built the same way, ``cls(seed=..., max_batches=...)``,
    and ignores what it does not use. ``needs_calibration``: :meth:`prepare`
    needs calibration batches; ``needs_loss``: it also needs ``loss_fn``.
    """

    needs_calibration = False
    needs_loss = False

    def __init__(self, *, seed: int = 0, max_batches: int = 8):
        self.seed = seed
        self.max_batches = max_batches

    def prepare(self, model, groups, calibration=None, forward=None, loss_fn=None) -> None:
        """Collect whatever the criterion needs (a calibration pass); the model is left unchanged."""

    def score(self, model: nn.Module, group: Group) -> torch.Tensor:
        raise NotImplementedError


IMPORTANCES: dict[str, type[Importance]] = {}

_I = TypeVar("_I", bound=type[Importance])


def register_importance(name: str) -> Callable[[_I], _I]:
    """Class decorator naming a criterion: ``@register_importance("mine") class Mine(Importance): ...``."""

    def register(cls: _I) -> _I:
        if not (isinstance(cls, type) and issubclass(cls, Importance)):
            raise TypeError(f"importance {name!r} must be an Importance subclass, got {cls!r}")
        if name in IMPORTANCES:
            raise ValueError(f"importance {name!r} is already registered ({IMPORTANCES[name].__name__})")
        IMPORTANCES[name] = cls
        return cls

    return register


def importance_names() -> list[str]:
    return list(IMPORTANCES)


def importance_class(name: str) -> type[Importance]:
    """The registered criterion called ``name``; a ConfigError listing the known names otherwise."""
    if not isinstance(name, str) or name not in IMPORTANCES:
        raise ConfigError("importance", f"must be one of {', '.join(IMPORTANCES)}; got {name!r}")
    return IMPORTANCES[name]


def make_importance(name: str, seed: int = 0, max_batches: int = 8) -> Importance:
    return importance_class(name)(seed=seed, max_batches=max_batches)


@register_importance("l1")
class L1Importance(Importance):
    """Sum of |w| over every weight of the unit (producer rows, follower params, consumer columns)."""

    def score(self, model, group):
        return sum(t.abs().sum(1) for t in group_tensors(model, group)).float()


@register_importance("l2")
class L2Importance(Importance):
    def score(self, model, group):
        return sum(t.pow(2).sum(1) for t in group_tensors(model, group)).float().sqrt()


@register_importance("random")
class RandomImportance(Importance):
    """A control: random scores (seeded)."""

    def __init__(self, *, seed: int = 0, max_batches: int = 8):
        super().__init__(seed=seed, max_batches=max_batches)
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, model, group):
        return torch.rand(group.units, generator=self.generator)


class _ConsumerInputStats(Importance):
    """Statistics of the units' values where their consumers read them, over calibration batches."""

    needs_calibration = True

    def __init__(self, *, seed: int = 0, max_batches: int = 8):
        super().__init__(seed=seed, max_batches=max_batches)
        self.stats: dict[str, torch.Tensor] = {}

    def prepare(self, model, groups, calibration=None, forward=None, loss_fn=None):
        modules = dict(model.named_modules())
        handles = []
        for group in groups:
            for cname, span in group.consumers.items():
                module = modules[cname]
                hook = self._hook(group, span, module)
                handles.append(module.register_forward_pre_hook(hook))
        try:
            run_calibration(model, calibration, forward, self.max_batches, on_batch=self._set_mask)
        finally:
            self._mask = None
            for h in handles:
                h.remove()

    def _hook(self, group: Group, span: Span, module: nn.Module):
        def hook(mod, args):
            x = args[0].detach()
            mask = self._mask
            if (
                isinstance(module, nn.Linear)
                and mask is not None
                and x.dim() >= 3
                and x.shape[:2] == mask.shape
            ):
                x = x[mask]  # padding tokens carry no signal: keep the real ones only
            dim = x.dim() - 1 if isinstance(module, nn.Linear) else 1
            per_unit = unit_view(x.float(), dim, span, group.units)  # (units, block * samples)
            value = self.statistic(per_unit, module, span, group.units)
            self.stats[group.name] = self.stats.get(group.name, 0) + value

        return hook

    def statistic(self, per_unit, module, span, units) -> torch.Tensor:
        raise NotImplementedError

    _mask: torch.Tensor | None = None

    def _set_mask(self, batch: Any) -> None:
        """Token mask of a text batch (``attention_mask``), to skip padding in the statistics."""
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self._mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def score(self, model, group):
        return self.stats[group.name]


@register_importance("activation")
class ActivationImportance(_ConsumerInputStats):
    """Mean |activation| of the unit as its consumers see it."""

    def statistic(self, per_unit, module, span, units):
        return per_unit.abs().mean(1)


@register_importance("apoz")
class APoZImportance(_ConsumerInputStats):
    """1 - APoZ (Hu et al., 2016): units that are almost always exactly zero go first."""

    def statistic(self, per_unit, module, span, units):
        return (per_unit != 0).float().mean(1)


@register_importance("output")
class OutputImportance(_ConsumerInputStats):
    """Energy each unit contributes to its consumers' outputs: ||x_u W_u^T||^2 on calibration data.

    Removing a unit removes exactly this term from the consumer's output, so
    ranking by it is an output-reconstruction criterion (activation x weight).
    """

    def statistic(self, per_unit, module, span, units):
        w = unit_view(module.weight.detach().float(), 1, span, units)  # (units, block * out [* k])
        if isinstance(module, nn.Linear) and span.block > 1:
            x = per_unit.reshape(units, span.block, -1)  # (units, block, samples)
            w = w.reshape(units, span.block, -1)  # (units, block, out)
            return torch.einsum("ubs,ubo->uso", x, w).pow(2).sum((1, 2))
        return per_unit.pow(2).sum(1) * w.pow(2).sum(1)


@register_importance("taylor")
class TaylorImportance(Importance):
    """First-order Taylor (Molchanov et al., 2019): (sum over the unit's weights of w * dL/dw)^2 per batch."""

    needs_calibration = True
    needs_loss = True

    def __init__(self, *, seed: int = 0, max_batches: int = 8):
        super().__init__(seed=seed, max_batches=max_batches)
        self.stats: dict[str, torch.Tensor] = {}

    def prepare(self, model, groups, calibration=None, forward=None, loss_fn=None):
        if loss_fn is None:
            raise ValueError("Taylor importance needs loss_fn(model, batch) -> scalar loss")
        saved = {p: p.grad for p in model.parameters()}
        flags = {p: p.requires_grad for p in model.parameters()}
        was_training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(True)
            for i, batch in enumerate(calibration):
                if i >= self.max_batches:
                    break
                model.zero_grad(set_to_none=True)
                loss_fn(model, batch).backward()
                for group in groups:
                    pairs = zip(group_tensors(model, group), group_tensors(model, group, grads=True))
                    contrib = sum((w * g).sum(1) for w, g in pairs).float()
                    self.stats[group.name] = self.stats.get(group.name, 0) + contrib.pow(2)
        finally:
            for p, g in saved.items():
                p.grad = g
                p.requires_grad_(flags[p])
            for m, mode in was_training.items():
                m.training = mode

    def score(self, model, group):
        return self.stats[group.name]


def run_calibration(
    model: nn.Module, calibration: Iterable, forward: Callable | None, max_batches: int, on_batch=None
) -> None:
    forward = forward or default_forward
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(calibration):
                if i >= max_batches:
                    break
                if on_batch is not None:
                    on_batch(batch)
                forward(model, batch)
    finally:
        for m, mode in was_training.items():
            m.training = mode
