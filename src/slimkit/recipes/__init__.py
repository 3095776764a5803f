"""Recipes: YAML files that chain steps, validated before any work starts."""

from slimkit.recipes.registry import StepType, available_steps
from slimkit.recipes.runner import run_recipe
from slimkit.recipes.schema import MeasureConfig, Recipe, load_recipe, parse_recipe

__all__ = [
    "MeasureConfig",
    "Recipe",
    "StepType",
    "available_steps",
    "load_recipe",
    "parse_recipe",
    "run_recipe",
]
