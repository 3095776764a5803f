"""Recipes: YAML files that chain steps, validated before any work starts.

Step types live in :mod:`slimkit.recipes.steps`, one module each, with the step
contract (``RunContext``, ``StepResult``, ``register_step``).
"""

from slimkit.recipes.measure import MeasureConfig
from slimkit.recipes.runner import run_recipe
from slimkit.recipes.schema import Recipe, Step, load_recipe, parse_recipe
from slimkit.recipes.steps import RunContext, StepResult, StepType, available_steps, register_step

__all__ = [
    "MeasureConfig",
    "Recipe",
    "RunContext",
    "Step",
    "StepResult",
    "StepType",
    "available_steps",
    "load_recipe",
    "parse_recipe",
    "register_step",
    "run_recipe",
]
