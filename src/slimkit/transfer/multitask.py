"""Multi-task learning: one shared encoder, one head per task, trained on mixed batches.

A training step is one *mixed* batch: each of its examples is drawn from task
``t`` with probability ``p_t`` (proportional to the task's size, or to
``n_t ** (1/T)``), the encoder runs once over the whole batch, and every head
scores its own rows. The per-task losses are combined by a weighting
(:mod:`slimkit.transfer.weighting`). All of it runs inside the one Trainer:
the model it trains is a :class:`MultiTaskObjective` (the model plus the
weighting's learnable parameters), each dataset item is one planned batch, and
a callback redraws the plan every epoch from ``(seed, epoch)`` so that resumed
runs see the same batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from slimkit.batch import text_inputs
from slimkit.data.base import DataBundle
from slimkit.errors import ConfigError
from slimkit.tasks import build_task
from slimkit.train import Callback, Trainer, TrainResult
from slimkit.transfer.config import MultiTaskConfig
from slimkit.transfer.finetune import with_loss
from slimkit.transfer.heads import PooledEncoder, TaskHead, check_outputs, data_outputs, pooled_backbone
from slimkit.transfer.strategies import layer_groups
from slimkit.transfer.weighting import FixedWeighting, GradNorm, UncertaintyWeighting

PRIMARY_METRIC = {"classification": "accuracy", "regression": "spearman"}


class MultiTaskModel(nn.Module):
    """``forward(**inputs, task=name)`` gives that task's outputs; without ``task``, the default one's."""

    def __init__(
        self, backbone: PooledEncoder, heads: dict[str, TaskHead], kinds: dict[str, str], default: str
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.kinds = dict(kinds)
        self.default_task = default

    @property
    def base_model(self) -> nn.Module:
        return self.backbone.encoder

    def forward(
        self, input_ids: torch.Tensor, task: str | None = None, **inputs: torch.Tensor
    ) -> torch.Tensor:
        name = task or self.default_task
        if name not in self.heads:
            raise KeyError(f"task {name!r} is not one of {', '.join(self.heads)}")
        return self.heads[name](self.backbone(input_ids, **inputs))


class TaskView(nn.Module):
    """One task of a multi-task model as an ordinary single-output model (for the task adapter)."""

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, task=self.task, **inputs)


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]
    loss: torch.Tensor


class MultiTaskObjective(nn.Module):
    """What the Trainer trains: the model and the loss weighting's parameters, together."""

    def __init__(self, model: MultiTaskModel, weighting: nn.Module):
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.names = list(model.heads)

    def forward(self, batch: dict) -> StepOutput:
        features = self.model.backbone(**text_inputs(batch))
        losses = {}
        for i, name in enumerate(self.names):
            rows = batch["task_ids"] == i
            if bool(rows.any()):
                out, target = self.model.heads[name](features[rows]), batch["targets"][rows]
                losses[name] = task_loss(self.model.kinds[name], out, target)
        shared = layer_groups(self.model.base_model)[-1] if isinstance(self.weighting, GradNorm) else ()
        return StepOutput(losses, self.weighting(losses, shared))


def task_loss(kind: str, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "regression":
        return nn.functional.mse_loss(outputs.reshape(-1), target.float())
    return nn.functional.cross_entropy(outputs, target.long())


class MixedBatches(Dataset):
    """Item ``i`` is the ``i``-th planned batch of the current epoch: a list of (task index, row index)."""

    def __init__(self, sizes: Sequence[int], probs: np.ndarray, batch_size: int, steps: int, seed: int):
        self.sizes, self.probs, self.batch_size, self.steps, self.seed = (
            list(sizes),
            probs,
            batch_size,
            steps,
            seed,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        orders = [rng.permutation(n) for n in self.sizes]
        cursor = [0] * len(self.sizes)
        self.plans = []
        for _ in range(self.steps):
            plan = []
            for t, count in enumerate(rng.multinomial(self.batch_size, self.probs)):
                for _ in range(count):  # walk each task's permutation; reshuffle when it runs out
                    if cursor[t] == self.sizes[t]:
                        orders[t], cursor[t] = rng.permutation(self.sizes[t]), 0
                    plan.append((t, int(orders[t][cursor[t]])))
                    cursor[t] += 1
            self.plans.append(plan)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> list[tuple[int, int]]:
        return self.plans[i]


class _Replan(Callback):
    def __init__(self, batches: MixedBatches):
        self.batches = batches

    def on_epoch_begin(self, trainer) -> None:
        self.batches.set_epoch(trainer.state["epoch"])


def task_probabilities(sizes: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """``p_t`` proportional to ``n_t ** (1 / temperature)``: 1 is proportional, larger flattens."""
    weights = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    return weights / weights.sum()


def mixed_collate(tokenizer, datasets: Sequence[Dataset], max_length: int):
    """Tokenize a planned batch: inputs, ``task_ids`` (first: it gives the batch size) and ``targets``."""

    def collate(items: list) -> dict[str, torch.Tensor]:
        (plan,) = items
        rows = [datasets[t][i] for t, i in plan]
        enc = tokenizer(
            [r["text"] for r in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        targets = [float(r["label"]) if "label" in r else float(r["score"]) for r in rows]
        batch = {"task_ids": torch.tensor([t for t, _ in plan], dtype=torch.int64)}
        batch.update(text_inputs(enc))
        batch["targets"] = torch.tensor(targets, dtype=torch.float64)
        return batch

    return collate


@dataclass
class MultiTaskResult:
    model: MultiTaskModel
    train: TrainResult
    metrics: dict[str, dict[str, float]]  # per task, on each task's test split
    weights: dict[str, float]  # the final loss weight of each task
    notes: dict = field(default_factory=dict)


def build_multitask_model(
    model: nn.Module, tasks: dict[str, DataBundle], config: MultiTaskConfig, default: str
) -> MultiTaskModel:
    """A new multi-task model on ``model``'s encoder (shared with it; copy first to keep ``model``)."""
    backbone = pooled_backbone(model, config.head.pooling)
    heads, kinds = {}, {}
    for i, spec in enumerate(config.tasks):
        data = tasks[spec.name]
        outputs = spec.num_labels or data_outputs(data, f"tasks[{i}].data")
        check_outputs(outputs, data, f"tasks[{i}].num_labels")
        heads[spec.name] = TaskHead(backbone.hidden_size, outputs, config.head.dropout, config.head.hidden)
        kinds[spec.name] = data.task
    return MultiTaskModel(backbone, heads, kinds, default)


def _check_tasks(tasks: dict[str, DataBundle], config: MultiTaskConfig) -> None:
    names = [t.name for t in config.tasks]
    missing = [n for n in names if n not in tasks]
    if missing or len(tasks) != len(names):
        raise ConfigError("tasks", f"data given for {sorted(tasks)} but the config names {names}")
    for i, name in enumerate(names):
        data = tasks[name]
        if data.input_kind != "text" or any(data.train[j].get("text_pair") for j in range(len(data.train))):
            raise ConfigError(f"tasks[{i}].data", f"{data.name}: multi-task needs single-sentence text data")


def _weighting(config: MultiTaskConfig, kinds: dict[str, str]) -> nn.Module:
    names = [t.name for t in config.tasks]
    weights = [t.weight for t in config.tasks]
    if config.weighting == "uncertainty":
        return UncertaintyWeighting(names, [kinds[n] for n in names])
    if config.weighting == "gradnorm":
        return GradNorm(names, weights, config.gradnorm_alpha)
    return FixedWeighting(names, weights)


def train_multitask(
    model: nn.Module,
    tasks: dict[str, DataBundle],
    config: MultiTaskConfig,
    tokenizer,
    default: str | None = None,
    callbacks: Sequence[Callback] = (),
    resume_from: str | Path | None = None,
) -> MultiTaskResult:
    """Train a multi-task model on a copy of ``model``'s encoder; score each task on its test split."""
    _check_tasks(tasks, config)
    default = default or config.tasks[0].name
    max_length = config.max_length or 128
    mt_model = build_multitask_model(copy.deepcopy(model), tasks, config, default)
    objective = MultiTaskObjective(mt_model, _weighting(config, mt_model.kinds))
    names = list(mt_model.heads)
    sizes = [len(tasks[n].train) for n in names]
    temperature = config.temperature if config.sampling == "temperature" else 1.0
    cfg = config.train
    steps = config.steps_per_epoch or math.ceil(sum(sizes) / cfg.batch_size)
    batches = MixedBatches(sizes, task_probabilities(sizes, temperature), cfg.batch_size, steps, cfg.seed)
    has_val = all(tasks[n].val is not None and len(tasks[n].val) > 0 for n in names)
    trainer = Trainer(
        objective,
        # One item = one planned batch of cfg.batch_size examples; the default monitor is the mean score.
        replace(cfg, batch_size=1, monitor=cfg.monitor or "val_score"),
        callbacks=[_Replan(batches), *callbacks],
        forward=lambda m, b: m(b),
        loss_fn=lambda out, b: out.loss,
        collate_fn=mixed_collate(tokenizer, [tasks[n].train for n in names], max_length),
        evaluate=(lambda m: _val_metrics(m.model, tasks, tokenizer, max_length)) if has_val else None,
        param_groups=lambda m: _groups(m, config.weighting_lr / cfg.lr, config.head_lr_scale),
    )
    result = trainer.fit(batches, resume_from=resume_from)
    mt_model.train(model.training)
    metrics = evaluate_tasks(mt_model, tasks, tokenizer, max_length)
    notes = {
        "steps_per_epoch": steps,
        "task_probabilities": dict(zip(names, batches.probs.round(4).tolist())),
    }
    return MultiTaskResult(mt_model, result, metrics, objective.weighting.current(), notes)


def _groups(objective: MultiTaskObjective, weighting_scale: float, head_scale: float) -> list[dict]:
    return [
        {"params": list(objective.model.backbone.parameters()), "lr_scale": 1.0},
        {"params": list(objective.model.heads.parameters()), "lr_scale": head_scale, "role": "head"},
        {"params": list(objective.weighting.parameters()), "lr_scale": weighting_scale, "weight_decay": 0.0},
    ]


def evaluate_tasks(
    model: MultiTaskModel, tasks: dict[str, DataBundle], tokenizer, max_length: int = 128, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Each task's metrics (the task adapter's own) on its ``split``, through its own head."""
    out = {}
    for name in model.heads:
        data = tasks[name]
        task = build_task(data, tokenizer, max_length=max_length)
        out[name] = task.evaluate(TaskView(model, name), getattr(data, split))
    return out


def _val_metrics(model: MultiTaskModel, tasks, tokenizer, max_length: int) -> dict[str, float]:
    """Per-task validation metrics, flattened, with ``score`` (mean primary metric) and ``loss`` (mean loss)."""
    per_task = evaluate_tasks(model, tasks, tokenizer, max_length, split="val")
    flat = {f"{name}_{k}": v for name, metrics in per_task.items() for k, v in metrics.items()}
    primary = [m[PRIMARY_METRIC[model.kinds[n]]] for n, m in per_task.items()]
    flat["score"] = float(np.mean(primary))
    flat["loss"] = float(np.mean([with_loss(m)["loss"] for m in per_task.values()]))
    return flat
