"""``recipe.reproduce.yaml``: a searched model rebuilt by ordinary steps, without searching.

The ``search`` step writes the chosen candidate as recipe steps (``search_steps.yaml``) and the
model it started from (``search_input.safetensors``); here, once the run's recipe is known, they
become a whole recipe: the same data, measure and seed, the model loaded from that file (the steps
before the search are in its weights), the candidate's steps, then the steps after the search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slimkit.recipes.schema import Recipe
from slimkit.recipes.steps.search import INPUT_WEIGHTS, STEPS_FILE, TEACHER
from slimkit.utils.io import write_text

FILE = "recipe.reproduce.yaml"


def write_reproduction(recipe: Recipe, run_dir: Path) -> None:
    """Write ``recipe.reproduce.yaml`` into the run folder when a search step ran (else nothing)."""
    found = run_dir / STEPS_FILE
    if not found.is_file():
        return
    plain = recipe.to_dict()
    last = max(i for i, s in enumerate(recipe.steps) if s.type == "search")
    output = Path(recipe.output)
    model = {k: v for k, v in plain["model"].items() if v not in (None, {}, [])}
    model["weights"] = str(output / INPUT_WEIGHTS)
    steps = [_teacher(step, model) for step in yaml.safe_load(found.read_text(encoding="utf-8"))]
    made = {
        **plain,
        "name": f"{recipe.name}_reproduced",
        "model": model,
        "steps": steps + plain["steps"][last + 1 :],
        "output": f"{output}_reproduced",
        "overwrite": True,
    }
    note = (
        f"# The model chosen by the search of {recipe.name}, built without searching: from the model the\n"
        f"# search started from ({INPUT_WEIGHTS}), with the steps that made the chosen candidate.\n"
    )
    write_text(run_dir / FILE, note + yaml.safe_dump(made, sort_keys=False))
    found.unlink()


def _teacher(step: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    return {**step, "teacher": model} if step.get("teacher") == TEACHER else step
