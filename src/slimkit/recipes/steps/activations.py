"""The ``replace_activations`` step: cheaper activation functions, with optional recovery training.

YAML::

    - type: replace_activations
      replace_activations: {to: relu}          # GELU/SiLU -> ReLU; or hardswish, hardsigmoid, pwl
      train: {epochs: 2, lr: 0.001}            # optional recovery fine-tune on the recipe's data

    - type: replace_activations               # every GELU of the encoder -> 16 linear segments
      replace_activations: {to: pwl, pwl_segments: 16, from_: [gelu], exclude: [pooler.activation]}
    - type: distill                            # recovery by distillation from the original model
      student: current
      teacher: initial
      train: {epochs: 1, lr: 0.00002}

``replace_activations:`` is :class:`slimkit.activations.ReplaceActivationsConfig`. The model keeps
its weights and its saved format (the new modules hold no state); ``--resume`` re-applies the
replacement to the model before the step and loads the saved weights into it. The step's notes
give the count per kind and each kind's largest difference to the function it replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimkit.activations import ReplaceActivationsConfig, replace_activations_
from slimkit.recipes.steps.base import RunContext, StepResult, register_step, under
from slimkit.recipes.steps.saving import SavedModel
from slimkit.train import TrainConfig


@dataclass(frozen=True)
class ReplaceActivationsStep:
    replace_activations: ReplaceActivationsConfig = field(default_factory=ReplaceActivationsConfig)
    train: TrainConfig | None = None  # recovery fine-tune on the recipe's data after the swap


def restore_replaced(ctx: RunContext, cfg: ReplaceActivationsStep, saved: SavedModel) -> nn.Module:
    """--resume: the model before the step with the same activations replaced, then its saved weights."""
    with under("replace_activations"):
        replace_activations_(ctx.model, cfg.replace_activations)
    return saved.load(ctx.model)


@register_step(
    "replace_activations",
    config=ReplaceActivationsStep,
    doc="replace GELU/SiLU/tanh/sigmoid by ReLU, hard-swish/-sigmoid or a piecewise-linear table",
    restore=restore_replaced,
)
def run_replace_activations(ctx: RunContext, cfg: ReplaceActivationsStep) -> StepResult:
    model = ctx.model
    with under("replace_activations"):
        summary = replace_activations_(model, cfg.replace_activations)
    notes = {
        "to": summary.to,
        "replaced": summary.counts,
        "max_abs_error": {kind: round(e, 5) for kind, e in summary.max_error.items()},
    }
    if summary.kept:
        notes["kept"] = len(summary.kept)
    ctx.log.info("replace_activations: %s", ", ".join(f"{n} {k}" for k, n in summary.counts.items()))
    if cfg.train is not None:
        result = ctx.train(model, cfg.train)
        notes.update(
            epochs=len(result.history),
            best_epoch=result.best_epoch,
            train_time_s=round(result.train_time_s, 2),
        )
    return StepResult(model, notes=notes)
