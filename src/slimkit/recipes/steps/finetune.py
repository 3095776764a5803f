"""The ``finetune`` step: a pretrained encoder (or a model slimkit trained) becomes a task model.

YAML::

    - type: finetune
      finetune: {strategy: full, head: {pooling: mean, dropout: 0.1}, head_lr_scale: 20}
      train: {epochs: 3, batch_size: 32, lr: 0.00005, monitor: val_accuracy}

``finetune:`` is :class:`slimkit.transfer.FinetuneConfig` without its ``train``
(the step's ``train:``). With ``finetune.data`` it trains on another data set
first (a source task), whose head must fit the recipe's data too: every step's
model is scored on the recipe's data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimkit.config import to_dict
from slimkit.data.registry import DataConfig, load_data
from slimkit.errors import ConfigError, DataError
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
from slimkit.recipes.steps.saving import SavedModel
from slimkit.tasks import build_task
from slimkit.train import TrainConfig
from slimkit.transfer import FinetuneConfig, finetune
from slimkit.transfer.finetune import finetuned_structure
from slimkit.transfer.heads import data_outputs


def _settings(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "train"]


@dataclass(frozen=True)
class FinetuneStep:
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=lambda: library_default(FinetuneConfig, "train"))

    MOVED: ClassVar[dict[str, str]] = {
        **moved_under("finetune", _settings(FinetuneConfig), "fine-tuning settings"),
        "finetune.train": NESTED_TRAIN.format(block="finetune"),
    }

    def __post_init__(self):
        with under("finetune"):  # checks that need both (an unfreezing schedule against train.epochs)
            set_field(self, "finetune", dataclasses.replace(self.finetune, train=self.train))

    def to_yaml(self) -> dict[str, Any]:
        return {"finetune": without(to_dict(self.finetune), "train"), "train": to_dict(self.train)}


def load_extra_data(config: DataConfig, path: str):
    """Another data set than the recipe's; a missing file is a recipe error naming the field."""
    try:
        return load_data(config, prefix=path)
    except DataError as err:
        field_path, _, message = str(err).partition(": ")
        raise ConfigError(field_path, message) from None


def need_tokenizer(ctx: RunContext, step: str) -> None:
    if ctx.tokenizer is None:
        raise ConfigError("model", f"the {step} step needs a Hugging Face model (model.hf) and its tokenizer")


def with_progress(config: Any, ctx: RunContext) -> Any:
    """A library config whose ``train`` shows progress only when the run does (the config is not changed)."""
    train = dataclasses.replace(config.train, progress=config.train.progress and ctx.progress)
    return dataclasses.replace(config, train=train)


def restore_finetune(ctx: RunContext, cfg: FinetuneStep, saved: SavedModel):
    """--resume: the model with its task head (and LoRA adapters, merged or not), as ``finetune`` makes it."""
    config = cfg.finetune
    with under("finetune"):
        data, _ = _train_data(ctx, config)
        model = finetuned_structure(ctx.model, data, config)
    return saved.load(model)


@register_step(
    "finetune",
    config=FinetuneStep,
    doc="fine-tune a pretrained encoder with a task head (linear probe, full, gradual, discriminative, LoRA)",
    restore=restore_finetune,
)
def run_finetune(ctx: RunContext, cfg: FinetuneStep) -> StepResult:
    need_tokenizer(ctx, "finetune")
    config = with_progress(cfg.finetune, ctx)
    with under("finetune"):
        data, task = _train_data(ctx, config)
        callbacks, resume_from = ctx.checkpointing()
        result = finetune(ctx.model, data, config, ctx.tokenizer, task, callbacks, resume_from)
    history = result.train.history
    notes = {
        **result.notes,
        "train_data": data.name,
        "total_params": result.total_params,
        "epochs": len(history),
        "best_epoch": result.train.best_epoch,
        "train_time_s": round(result.train.train_time_s, 2),
        "final_train_loss": history[-1]["train_loss"] if history else None,
    }
    ctx.log.info(
        "finetune (%s) on %s: %d of %d parameters trained, %.1f s",
        config.strategy,
        data.name,
        result.trainable_params,
        result.total_params,
        result.train.train_time_s,
    )
    return StepResult(result.model, notes=notes)


def _train_data(ctx: RunContext, config: FinetuneConfig):
    data, task = ctx.data, ctx.task
    if config.data is not None:
        data = load_extra_data(config.data, "data")
        if data_outputs(data, "data") != data_outputs(ctx.data, "data"):
            raise ConfigError(
                "data",
                f"{data.name} needs {data_outputs(data, 'data')} outputs but the recipe's {ctx.data.name} "
                f"needs {data_outputs(ctx.data, 'data')}: every step's model is scored on the recipe's data",
            )
    if config.data is not None or config.max_length is not None:
        task = build_task(data, ctx.tokenizer, max_length=config.max_length or ctx.measure.max_length)
    return data, task
