"""The ``finetune`` and ``multitask`` recipe steps.

``finetune`` turns the recipe's model (a sentence encoder, any Hugging Face
encoder, or a model slimkit trained) into a task model for the recipe's data,
or for another data set first (``data:``, a source task whose head must fit
the recipe's data too). ``multitask`` trains one shared encoder with a head per
task; the task without ``data`` is the recipe's own, and its head answers the
model's plain ``forward``, so the steps after it (prune, quantize, distil)
and the report see an ordinary model of the recipe's task.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.config import require
from slimkit.data.registry import load_data
from slimkit.errors import ConfigError, DataError
from slimkit.recipes.registry import StepType
from slimkit.tasks import build_task
from slimkit.transfer.config import FinetuneConfig, MultiTaskConfig
from slimkit.transfer.finetune import finetune
from slimkit.transfer.heads import data_outputs
from slimkit.transfer.multitask import train_multitask

DEFAULT_MAX_LENGTH = 128


def _load(config, field: str):
    try:
        return load_data(config, prefix=field)
    except DataError as err:
        path, _, message = str(err).partition(": ")
        raise ConfigError(path, message) from None


def _need_tokenizer(ctx, step: str) -> None:
    if ctx.tokenizer is None:
        raise ConfigError("model", f"the {step} step needs a Hugging Face model (model.hf) and its tokenizer")


def run_finetune(ctx, config: FinetuneConfig) -> None:
    _need_tokenizer(ctx, "finetune")
    data, task = ctx.data, ctx.task
    if config.data is not None:
        data = _load(config.data, "data")
        if data_outputs(data, "data") != data_outputs(ctx.data, "data"):
            raise ConfigError(
                "data",
                f"{data.name} needs {data_outputs(data, 'data')} outputs but the recipe's {ctx.data.name} "
                f"needs {data_outputs(ctx.data, 'data')}: every step's model is scored on the recipe's data",
            )
    if config.data is not None or config.max_length is not None:
        task = build_task(data, ctx.tokenizer, max_length=config.max_length or DEFAULT_MAX_LENGTH)
    config.train.progress = config.train.progress and ctx.progress
    result = finetune(ctx.model, data, config, ctx.tokenizer, task)
    ctx.model = result.model
    history = result.train.history
    ctx.notes.update(
        result.notes,
        train_data=data.name,
        total_params=result.total_params,
        epochs=len(history),
        best_epoch=result.train.best_epoch,
        train_time_s=round(result.train.train_time_s, 2),
        final_train_loss=history[-1]["train_loss"] if history else None,
    )
    ctx.log.info(
        "finetune (%s) on %s: %d of %d parameters trained, %.1f s",
        config.strategy,
        data.name,
        result.trainable_params,
        result.total_params,
        result.train.train_time_s,
    )


@dataclass
class MultiTaskStepConfig(MultiTaskConfig):
    """``MultiTaskConfig`` where exactly one task leaves out ``data``: the recipe's own data set."""

    def __post_init__(self):
        super().__post_init__()
        own = [t.name for t in self.tasks if t.data is None]
        require(
            len(own) == 1,
            "tasks",
            f"exactly one task must leave out data (it trains on the recipe's data); got {len(own)}",
        )


def run_multitask(ctx, config: MultiTaskStepConfig) -> None:
    _need_tokenizer(ctx, "multitask")
    tasks, primary = {}, ""
    for i, spec in enumerate(config.tasks):  # load every data set before any training
        if spec.data is None:
            tasks[spec.name], primary = ctx.data, spec.name
        else:
            tasks[spec.name] = _load(spec.data, f"tasks[{i}].data")
    config.train.progress = config.train.progress and ctx.progress
    result = train_multitask(ctx.model, tasks, config, ctx.tokenizer, default=primary)
    ctx.model = result.model
    for name, metrics in result.metrics.items():
        ctx.notes.update({f"{name}_{k}": round(v, 4) for k, v in metrics.items()})
    ctx.notes.update(
        {f"{name}_weight": round(w, 4) for name, w in result.weights.items()},
        default_task=primary,
        epochs=len(result.train.history),
        train_time_s=round(result.train.train_time_s, 2),
    )
    ctx.log.info("multitask (%s weighting): %s", config.weighting, result.metrics)


STEPS = {
    "finetune": StepType(
        FinetuneConfig,
        run_finetune,
        changes_model=True,
        doc="fine-tune a pretrained encoder with a task head (linear probe, full, gradual, discriminative, LoRA)",
    ),
    "multitask": StepType(
        MultiTaskStepConfig,
        run_multitask,
        changes_model=True,
        doc="train one shared encoder with a head per task (fixed, uncertainty or GradNorm loss weights)",
    ),
}
