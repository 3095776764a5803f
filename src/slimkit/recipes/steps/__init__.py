"""Recipe step types, one module each; importing this package registers all of them.

A new step type is a new module here: a frozen config dataclass and a
``run(ctx, cfg) -> StepResult`` decorated with :func:`register_step`, plus its
import below.
"""

# Imported to register their step types (explicit modules: nothing is looked up by name).
import slimkit.recipes.steps.activations  # noqa: F401
import slimkit.recipes.steps.distill  # noqa: F401
import slimkit.recipes.steps.evaluate  # noqa: F401
import slimkit.recipes.steps.export  # noqa: F401
import slimkit.recipes.steps.finetune  # noqa: F401
import slimkit.recipes.steps.multitask  # noqa: F401
import slimkit.recipes.steps.prune  # noqa: F401
import slimkit.recipes.steps.quantize  # noqa: F401
import slimkit.recipes.steps.search  # noqa: F401
import slimkit.recipes.steps.train  # noqa: F401
from slimkit.recipes.steps.base import (
    RunContext,
    StepResult,
    StepType,
    available_steps,
    register_step,
    step_type,
)

__all__ = ["RunContext", "StepResult", "StepType", "available_steps", "register_step", "step_type"]
