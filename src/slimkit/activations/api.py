"""``replace_activations_``: activation functions swapped for cheaper ones, with a summary.

The table :data:`REPLACEMENTS` (target name -> builder) is the family's list of methods; the
targets and the kinds each replaces are in :data:`slimkit.activations.config.TARGET_KINDS`.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.activations.config import TARGET_KINDS, ReplaceActivationsConfig
from slimkit.activations.kinds import KINDS, find_activations
from slimkit.activations.modules import HardGELU, PiecewiseLinear
from slimkit.config import short_repr
from slimkit.errors import ConfigError

Builder = Callable[[nn.Module, str, ReplaceActivationsConfig], nn.Module]

REPLACEMENTS: dict[str, Builder] = {
    "relu": lambda old, kind, cfg: nn.ReLU(),
    "hardswish": lambda old, kind, cfg: HardGELU() if kind == "gelu" else nn.Hardswish(),
    "hardsigmoid": lambda old, kind, cfg: nn.Hardtanh() if kind == "tanh" else nn.Hardsigmoid(),
    "pwl": lambda old, kind, cfg: PiecewiseLinear.fit(old, kind, cfg.pwl_segments),
}
assert REPLACEMENTS.keys() == TARGET_KINDS.keys()  # one table of targets: the config validates against it

ERROR_GRID = (-8.0, 8.0, 4001)  # where the replacement's largest difference to the old function is read


@dataclass
class ActivationSummary:
    """What :func:`replace_activations_` did.

    ``replaced``: module name -> the kind it was; ``new_types``: module name -> its new class;
    ``kept``: activations found but left (another kind, or outside ``layers``/``exclude``);
    ``max_error``: per kind, the largest ``|new(x) - old(x)|`` over ``x`` in [-8, 8].
    """

    to: str
    replaced: dict[str, str] = field(default_factory=dict)
    new_types: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Modules replaced per kind (``{"gelu": 6}``)."""
        found = Counter(self.replaced.values())
        return {kind: found[kind] for kind in KINDS if found[kind]}

    def table(self) -> str:
        lines = [f"activations -> {self.to}: {sum(self.counts.values())} replaced"]
        lines.append(f"{'kind':8s} {'count':>5s} {'new module':15s} {'max |error|':>11s}")
        for kind, n in self.counts.items():
            new = sorted({self.new_types[name] for name, k in self.replaced.items() if k == kind})
            lines.append(f"{kind:8s} {n:5d} {', '.join(new):15s} {self.max_error[kind]:11.4f}")
        if self.kept:
            kept = Counter(self.kept.values())
            lines.append("left as they were: " + ", ".join(f"{n} {k}" for k, n in kept.items()))
        return "\n".join(lines)


def _matches(name: str, pattern: str) -> bool:
    """fnmatch on the dotted module name; a bare name also matches as a suffix (``act`` ~ ``mlp.act``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def plan_replacements(model: nn.Module, config: ReplaceActivationsConfig) -> dict[str, str]:
    """The activations ``config`` replaces in ``model``: ``{module name: kind}`` (the model is only read).

    Raises ConfigError naming the field when a ``layers``/``exclude`` pattern matches no activation
    of the model, or when nothing is left to replace.
    """
    found = find_activations(model)
    if not found:
        raise ConfigError(
            "from_",
            f"the model has no {', '.join(KINDS)} activation module to replace "
            "(a function called inside forward is no module and cannot be replaced)",
        )
    for name, patterns in (("layers", config.layers), ("exclude", config.exclude)):
        for i, pattern in enumerate(patterns):
            if not any(_matches(n, pattern) for n in found):
                examples = ", ".join(list(found)[:3])
                raise ConfigError(
                    f"{name}[{i}]", f"pattern {short_repr(pattern)} matches no activation (e.g. {examples})"
                )
    chosen = {
        n: kind
        for n, kind in found.items()
        if kind in config.kinds
        and any(_matches(n, p) for p in config.layers)
        and not any(_matches(n, p) for p in config.exclude)
    }
    if not chosen:
        have = ", ".join(f"{n} {k}" for k, n in Counter(found.values()).items())
        raise ConfigError(
            "from_",
            f"no {'/'.join(config.kinds)} activation to replace in the chosen layers (the model has {have})",
        )
    return chosen


def _max_error(old: nn.Module, new: nn.Module) -> float:
    x = torch.linspace(*ERROR_GRID)
    with torch.no_grad():
        return float((new(x) - old(x)).abs().max())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_activations_(model: nn.Module, config: ReplaceActivationsConfig) -> ActivationSummary:
    """Replace the activations ``config`` selects, in place; every new module is built before the
    first is swapped in, so a failure leaves the model as it was."""
    chosen = plan_replacements(model, config)
    build = REPLACEMENTS[config.to]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    new, errors = {}, {}
    for name, kind in chosen.items():
        old = model.get_submodule(name)
        new[name] = build(old, kind, config).train(old.training)
        errors[kind] = max(errors.get(kind, 0.0), _max_error(old, new[name]))
    for name, module in new.items():
        _set_module(model, name, module.to(device))
    found = find_activations(model)
    return ActivationSummary(
        to=config.to,
        replaced=chosen,
        new_types={name: type(m).__name__ for name, m in new.items()},
        kept={n: k for n, k in found.items() if n not in chosen},
        max_error=errors,
    )
