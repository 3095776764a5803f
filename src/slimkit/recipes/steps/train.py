"""The ``train`` step: train the model with the training core.

YAML::

    - type: train
      train: {epochs: 10, lr: 0.003, optimizer: adamw, monitor: val_accuracy}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimkit.recipes.steps.base import RunContext, StepResult, moved_under, register_step
from slimkit.train import TrainConfig, TrainResult


@dataclass(frozen=True)
class TrainStep:
    train: TrainConfig = field(default_factory=TrainConfig)

    MOVED: ClassVar[dict[str, str]] = moved_under(
        "train", [f.name for f in dataclasses.fields(TrainConfig)], "training settings"
    )


def train_notes(result: TrainResult) -> dict[str, Any]:
    """The report row's training figures (also used by the steps that train in their own way)."""
    last = result.history[-1] if result.history else {}
    return {
        "epochs": len(result.history),
        "train_samples_per_s": round(result.samples_per_s, 1),
        "train_time_s": round(result.train_time_s, 2),
        "best_epoch": result.best_epoch,
        "final_train_loss": last.get("train_loss"),
    }


@register_step("train", config=TrainStep, doc="train the model with the training core")
def run_train(ctx: RunContext, cfg: TrainStep) -> StepResult:
    result = ctx.train(ctx.model, cfg.train)
    ctx.log.info(
        "train: %d epochs, %.1f samples/s, best epoch %s",
        len(result.history),
        result.samples_per_s,
        result.best_epoch,
    )
    return StepResult(ctx.model, notes=train_notes(result))
