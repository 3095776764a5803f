"""The ``train`` and ``evaluate`` recipe steps."""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.recipes.registry import StepType
from slimkit.train import TrainConfig


def run_train(ctx, config: TrainConfig) -> None:
    result = ctx.train(config)
    last = result.history[-1] if result.history else {}
    ctx.notes.update(
        epochs=len(result.history),
        train_samples_per_s=round(result.samples_per_s, 1),
        train_time_s=round(result.train_time_s, 2),
        best_epoch=result.best_epoch,
        final_train_loss=last.get("train_loss"),
    )
    ctx.log.info(
        "train: %d epochs, %.1f samples/s, best epoch %s",
        len(result.history),
        result.samples_per_s,
        result.best_epoch,
    )


@dataclass
class EvaluateConfig:
    """No options: every report row is measured the same way, on the test split."""


def run_evaluate(ctx, config: EvaluateConfig) -> None:
    """Nothing to change: the runner measures the model after every step."""


STEPS = {
    "train": StepType(
        TrainConfig, run_train, changes_model=True, doc="train the model with the training core"
    ),
    "evaluate": StepType(EvaluateConfig, run_evaluate, changes_model=False, doc="measure the model as it is"),
}
