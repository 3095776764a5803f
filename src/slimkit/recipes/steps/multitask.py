"""The ``multitask`` step: one shared encoder, a head per task.

YAML::

    - type: multitask
      multitask:
        tasks:
          - name: coarse                       # no data: the recipe's own data set
          - name: fine
            data: {name: trec, path: ../shared/data/trec, label: fine}
        weighting: uncertainty
      train: {epochs: 2, lr: 0.00005, monitor: val_score}

``multitask:`` is :class:`slimkit.transfer.MultiTaskConfig` without its
``train`` (the step's ``train:``). Exactly one task leaves out ``data``; its
head answers the model's plain ``forward``, so the steps after this one and
the report see an ordinary model of the recipe's task.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimkit.config import require, to_dict
from slimkit.recipes.steps.base import (
    NESTED_TRAIN,
    RunContext,
    StepResult,
    library_default,
    moved_under,
    register_step,
    set_field,
    under,
    without,
)
from slimkit.recipes.steps.finetune import load_extra_data, need_tokenizer, with_progress
from slimkit.recipes.steps.saving import SavedModel
from slimkit.train import TrainConfig
from slimkit.transfer import MultiTaskConfig, train_multitask
from slimkit.transfer.multitask import build_multitask_model


@dataclass(frozen=True)
class MultiTaskStep:
    multitask: MultiTaskConfig
    train: TrainConfig = field(default_factory=lambda: library_default(MultiTaskConfig, "train"))

    MOVED: ClassVar[dict[str, str]] = {
        **moved_under(
            "multitask",
            [f.name for f in dataclasses.fields(MultiTaskConfig) if f.name != "train"],
            "multi-task settings",
        ),
        "multitask.train": NESTED_TRAIN.format(block="multitask"),
    }

    def __post_init__(self):
        own = [t.name for t in self.multitask.tasks if t.data is None]
        require(
            len(own) == 1,
            "multitask.tasks",
            f"exactly one task must leave out data (it trains on the recipe's data); got {len(own)}",
        )
        with under("multitask"):
            set_field(self, "multitask", dataclasses.replace(self.multitask, train=self.train))

    def to_yaml(self) -> dict[str, Any]:
        return {"multitask": without(to_dict(self.multitask), "train"), "train": to_dict(self.train)}


def _tasks(ctx: RunContext, config: MultiTaskConfig) -> tuple[dict, str]:
    """Every task's data set (loaded before any training) and the task that uses the recipe's data."""
    tasks, primary = {}, ""
    for i, spec in enumerate(config.tasks):
        if spec.data is None:
            tasks[spec.name], primary = ctx.data, spec.name
        else:
            tasks[spec.name] = load_extra_data(spec.data, f"tasks[{i}].data")
    return tasks, primary


def restore_multitask(ctx: RunContext, cfg: MultiTaskStep, saved: SavedModel):
    """--resume: the multi-task model (shared encoder, a head per task), as ``train_multitask`` makes it."""
    with under("multitask"):
        tasks, primary = _tasks(ctx, cfg.multitask)
        model = build_multitask_model(copy.deepcopy(ctx.model), tasks, cfg.multitask, primary)
    model.train(ctx.model.training)
    return saved.load(model)


@register_step(
    "multitask",
    config=MultiTaskStep,
    doc="train one shared encoder with a head per task (fixed, uncertainty or GradNorm loss weights)",
    restore=restore_multitask,
)
def run_multitask(ctx: RunContext, cfg: MultiTaskStep) -> StepResult:
    need_tokenizer(ctx, "multitask")
    config = with_progress(cfg.multitask, ctx)
    with under("multitask"):
        tasks, primary = _tasks(ctx, config)
        callbacks, resume_from = ctx.checkpointing()
        result = train_multitask(
            ctx.model, tasks, config, ctx.tokenizer, primary, callbacks=callbacks, resume_from=resume_from
        )
    notes: dict[str, Any] = {}
    for name, metrics in result.metrics.items():
        notes.update({f"{name}_{k}": round(v, 4) for k, v in metrics.items()})
    notes.update(
        {f"{name}_weight": round(w, 4) for name, w in result.weights.items()},
        default_task=primary,
        epochs=len(result.train.history),
        train_time_s=round(result.train.train_time_s, 2),
    )
    ctx.log.info("multitask (%s weighting): %s", config.weighting, result.metrics)
    return StepResult(result.model, notes=notes)
