"""Fine-tune a pretrained encoder on a task, with the one training core.

:func:`finetune` works on a copy: the given model is left exactly as it was.
Everything that can be wrong (head size, LoRA patterns, the unfreezing
schedule) is checked on that copy before the first step, with errors naming
the config field.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import Dataset, Subset

from slimkit.data.base import DataBundle
from slimkit.errors import ConfigError, ModelError
from slimkit.tasks import TaskAdapter, build_task
from slimkit.train import Callback, Trainer, TrainResult
from slimkit.transfer.config import FinetuneConfig
from slimkit.transfer.heads import backbone_of, head_parameters, with_head
from slimkit.transfer.lora import add_lora_, lora_parameter_count, merge_lora_
from slimkit.transfer.strategies import (
    GradualUnfreezing,
    check_schedule,
    discriminative_groups,
    freeze_backbone_,
    layer_groups,
    set_trainable_,
    trainable_count,
)
from slimkit.utils.io import load_weights


@dataclass
class FinetuneResult:
    model: nn.Module
    train: TrainResult
    trainable_params: int  # parameters the optimizer updated (all of them, eventually, for gradual)
    total_params: int
    notes: dict = field(default_factory=dict)


def few_shot(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` examples, as balanced over the classes as the data allow (random ones for regression)."""
    if n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    labels = [_label(dataset[i]) for i in range(len(dataset))]
    if any(y is None for y in labels):
        return Subset(dataset, sorted(rng.permutation(len(dataset))[:n].tolist()))
    by_class: dict[int, list[int]] = {}
    for i in rng.permutation(len(dataset)).tolist():
        by_class.setdefault(labels[i], []).append(i)
    chosen: list[int] = []
    while len(chosen) < n:  # round-robin over the classes keeps them balanced
        for members in by_class.values():
            if members and len(chosen) < n:
                chosen.append(members.pop())
    return Subset(dataset, sorted(chosen))


def _label(item) -> int | None:
    if isinstance(item, dict):
        return int(item["label"]) if "label" in item else None
    return int(item[1]) if isinstance(item, (tuple, list)) and item[1].dim() == 0 else None


def with_loss(metrics: dict[str, float]) -> dict[str, float]:
    """Validation metrics with a ``loss`` for every task (the MSE for regression) to monitor."""
    return metrics if "loss" in metrics else dict(metrics, loss=metrics.get("mse", float("nan")))


def finetune(
    model: nn.Module,
    data: DataBundle,
    config: FinetuneConfig,
    tokenizer=None,
    task: TaskAdapter | None = None,
    callbacks: Sequence[Callback] = (),
    resume_from: str | Path | None = None,
) -> FinetuneResult:
    """Train a copy of ``model`` (with a head for ``data``'s task) on ``data.train``; validate on ``data.val``."""
    task = task or build_task(data, tokenizer, max_length=config.max_length or 128)
    train_set = (
        data.train if config.n_train is None else few_shot(data.train, config.n_train, config.train.seed)
    )
    was_training = model.training
    model = with_head(copy.deepcopy(model), config.head, data, config.reset_head)
    if config.weights is not None:
        _load_task_weights(model, config.weights)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    groups_fn, extra = _strategy(model, config, len(train_set))
    trainable = trainable_count(model) if config.strategy in ("linear_probe", "lora") else _total(model)
    val = data.val if data.val is not None and len(data.val) > 0 else None
    trainer = Trainer(
        model,
        copy.deepcopy(config.train),
        callbacks=[*extra, *callbacks],
        forward=task.forward,
        loss_fn=task.loss_fn,
        task=task.task,
        collate_fn=task.collate_fn,
        evaluate=(lambda m: with_loss(task.evaluate(m, val))) if val is not None else None,
        param_groups=groups_fn,
    )
    result = trainer.fit(train_set, val, resume_from=resume_from)
    notes = {"strategy": config.strategy, "n_train": len(train_set), "trainable_params": trainable}
    if config.strategy == "lora":
        notes["lora_params"] = lora_parameter_count(model)
        if config.lora.merge:
            notes["lora_merged_layers"] = merge_lora_(model)
    for p in model.parameters():  # strategies freeze for training only: hand back the flags it came with
        p.requires_grad_(flags.get(id(p), p.requires_grad))
    model.train(was_training)
    return FinetuneResult(model, result, trainable, _total(model), notes)


def finetuned_structure(model: nn.Module, data: DataBundle, config: FinetuneConfig) -> nn.Module:
    """What :func:`finetune` returns for these settings, untrained: a copy of ``model`` with its task head
    (and LoRA adapters, merged or not), with the trainable flags the model came with. Weights saved from
    a fine-tuned model load into it (``--resume`` rebuilds a finished finetune step this way)."""
    out = with_head(copy.deepcopy(model), config.head, data, config.reset_head)
    if config.strategy == "lora":
        flags = {id(p): p.requires_grad for p in out.parameters()}
        add_lora_(out, config.lora)
        for p in out.parameters():  # finetune hands back the flags the model came with
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        if config.lora.merge:
            merge_lora_(out)
    out.train(model.training)
    return out


def _load_task_weights(model: nn.Module, path: str) -> None:
    try:
        load_weights(model, path)
    except ModelError as err:
        raise ConfigError("weights", str(err)) from None


def _total(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _strategy(
    model: nn.Module, config: FinetuneConfig, n_train: int
) -> tuple[Callable[[nn.Module], list[dict]], list[Callback]]:
    """Set the model's trainable flags for ``config.strategy``; return its param groups and callbacks."""
    scale, strategy = config.head_lr_scale, config.strategy
    if strategy == "lora":
        add_lora_(model, config.lora)
        return (lambda m: _trainable_groups(m, scale)), []
    if strategy == "linear_probe":
        freeze_backbone_(model)
        return (lambda m: [{"params": head_parameters(m), "lr_scale": scale}]), []
    set_trainable_(list(model.parameters()), True)
    if strategy == "full":
        return (lambda m: _trainable_groups(m, scale)), []
    if strategy == "discriminative":
        discriminative_groups(model, config.layer_lr_decay, scale, config.layers)  # fail early on `layers`
        return (lambda m: discriminative_groups(m, config.layer_lr_decay, scale, config.layers)), []
    unfreezing = GradualUnfreezing(
        layer_groups(backbone_of(model), config.layers), config.unfreeze_every, config.unfreeze_unit
    )
    cfg = config.train
    check_schedule(unfreezing, n_train, cfg.batch_size, cfg.epochs, cfg.max_steps)
    return (lambda m: discriminative_groups(m, 1.0, scale, config.layers)), [unfreezing]


def _trainable_groups(model: nn.Module, head_scale: float) -> list[dict]:
    head = {id(p) for p in head_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in head], "lr_scale": head_scale},
        {"params": [p for p in params if id(p) not in head], "lr_scale": 1.0},
    ]


def compare_transfer(
    model: nn.Module,
    source: DataBundle,
    target: DataBundle,
    source_config: FinetuneConfig,
    target_config: FinetuneConfig,
    tokenizer=None,
) -> dict[str, dict[str, float]]:
    """Target test metrics of source->target transfer against training the target from ``model`` directly."""
    if source.task != target.task:
        raise ConfigError("target", f"source task {source.task} and target task {target.task} differ")
    target_task = build_task(target, tokenizer, max_length=target_config.max_length or 128)
    on_source = finetune(model, source, source_config, tokenizer).model
    transferred = finetune(on_source, target, target_config, tokenizer, target_task).model
    direct = finetune(model, target, target_config, tokenizer, target_task).model
    return {
        "source_only": target_task.evaluate(on_source, target.test),
        "transfer": target_task.evaluate(transferred, target.test),
        "direct": target_task.evaluate(direct, target.test),
    }
