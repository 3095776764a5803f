"""The ``evaluate`` step: a report row for the model as it is (``{type: evaluate}``, no settings)."""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.recipes.steps.base import RunContext, StepResult, register_step


@dataclass(frozen=True)
class EvaluateStep:
    """No options: every report row is measured the same way, on the test split."""


@register_step("evaluate", config=EvaluateStep, doc="measure the model as it is")
def run_evaluate(ctx: RunContext, cfg: EvaluateStep) -> StepResult:
    return StepResult(ctx.model)  # the runner measures the model after every step
