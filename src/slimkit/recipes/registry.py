"""Recipe step types.

Each technique family registers its steps in its own ``recipe`` module; the
modules are imported only when a recipe names one of their steps, so importing
slimkit never pulls in every family (and their optional dependencies).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimkit.errors import ConfigError

# step type -> module whose STEPS dict defines it
STEP_MODULES = {
    "train": "slimkit.recipes.core_steps",
    "evaluate": "slimkit.recipes.core_steps",
    "prune": "slimkit.prune.recipe",
    "quantize": "slimkit.quant.recipe",
    "export": "slimkit.quant.recipe",
    "distill": "slimkit.distill.recipe",
    "finetune": "slimkit.transfer.recipe",
    "multitask": "slimkit.transfer.recipe",
}


@dataclass(frozen=True)
class StepType:
    """``run(ctx, config)`` changes ``ctx.model`` in place (or only measures, if ``changes_model`` is False)."""

    config: type
    run: Callable[[Any, Any], None]
    changes_model: bool = True
    doc: str = ""
    last_only: bool = False  # nothing can follow it (e.g. export: the model leaves PyTorch)
    # check_before(earlier_steps, path): raise ConfigError if an earlier step makes this one impossible
    check_before: Callable[[list, str], None] | None = None


def available_steps() -> dict[str, StepType]:
    found = {}
    for name, module in STEP_MODULES.items():
        try:
            found[name] = importlib.import_module(module).STEPS[name]
        except ModuleNotFoundError:
            continue
    return found


def step_type(name: Any, path: str) -> StepType:
    module = STEP_MODULES.get(name) if isinstance(name, str) else None
    if module is not None:
        try:
            return importlib.import_module(module).STEPS[name]
        except ModuleNotFoundError as err:
            if not err.name or not module.startswith(err.name):
                raise
    known = ", ".join(available_steps())
    raise ConfigError(path, f"unknown step type {name!r} (available: {known})")
