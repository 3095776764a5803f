"""Configs of transfer learning (``finetune``) and multi-task learning (``multitask``).

Everything that can be checked without the model is checked here, on
construction; what needs the model (a LoRA pattern that matches no layer, a
head that does not fit the data, an unfreezing schedule longer than the run)
is checked by the API before the model is touched, and named by its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slimkit.config import in_range, non_negative, one_of, positive, positive_int, require
from slimkit.data.registry import DataConfig
from slimkit.train.config import TrainConfig

STRATEGIES = ("linear_probe", "full", "gradual", "discriminative", "lora")
POOLINGS = ("mean", "cls")


def _check_max_length(value) -> None:
    if value is not None:
        require(isinstance(value, int) and value >= 2, "max_length", "must be an integer >= 2")


def _finetune_train() -> TrainConfig:
    return TrainConfig(epochs=3, batch_size=32, lr=5e-5, weight_decay=0.01)


@dataclass
class HeadConfig:
    """A task head on the pooled encoder output: [dropout, Linear(hidden), tanh,] dropout, Linear."""

    num_labels: int | None = None  # None: the data's class count (1 for regression)
    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = 0.1
    hidden: int | None = None  # an extra hidden layer of this width

    def __post_init__(self):
        if self.num_labels is not None:
            positive_int(self.num_labels, "num_labels")
        one_of(self.pooling, "pooling", POOLINGS)
        in_range(self.dropout, "dropout", 0.0, 1.0, hi_open=True)
        if self.hidden is not None:
            positive_int(self.hidden, "hidden")


@dataclass
class LoraSpec:
    """Low-rank adapters (via peft) on the backbone's Linear layers whose names match ``target_modules``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["*.query", "*.value"])  # fnmatch patterns
    merge: bool = True  # fold the adapters into the weights after training: a plain model again

    def __post_init__(self):
        positive_int(self.r, "r")
        positive(self.alpha, "alpha")
        in_range(self.dropout, "dropout", 0.0, 1.0, hi_open=True)
        require(
            isinstance(self.target_modules, list) and len(self.target_modules) > 0,
            "target_modules",
            "must be a non-empty list of layer-name patterns",
        )
        for i, pattern in enumerate(self.target_modules):
            require(
                isinstance(pattern, str) and pattern.strip() != "",
                f"target_modules[{i}]",
                "must be a non-empty pattern",
            )


@dataclass
class FinetuneConfig:
    """Fine-tune a pretrained encoder with a task head.

    ``strategy``: ``linear_probe`` (frozen backbone), ``full``, ``gradual``
    (unfreeze one layer group from the top every ``unfreeze_every`` epochs or
    steps), ``discriminative`` (layer ``k`` below the top trains at
    ``lr * layer_lr_decay**k``) or ``lora``. ``data`` trains on another data
    set than the recipe's (a source task); ``n_train`` keeps that many
    training examples, balanced over classes (few-shot adaptation). ``train`` is the
    training core's :class:`TrainConfig`: in a recipe, fields left out of ``train:``
    take *its* defaults (``lr: 0.001``), so set ``lr`` there (about 5e-5 for full
    fine-tuning of a BERT-size encoder).
    """

    strategy: Literal["linear_probe", "full", "gradual", "discriminative", "lora"] = "full"
    train: TrainConfig = field(default_factory=_finetune_train)
    head: HeadConfig = field(default_factory=HeadConfig)
    reset_head: bool = False  # replace a head the model already has
    weights: str | None = None  # a slimkit-trained task model's .safetensors, loaded once the head is on
    head_lr_scale: float = 1.0  # the head's learning rate is lr * head_lr_scale
    unfreeze_every: int = 1
    unfreeze_unit: Literal["epoch", "step"] = "epoch"
    layer_lr_decay: float = 0.8
    layers: str | None = None  # fnmatch pattern naming the list of blocks; None: the longest ModuleList
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataConfig | None = None
    n_train: int | None = None
    max_length: int | None = None  # tokens; None: the recipe's measure.max_length

    def __post_init__(self):
        one_of(self.strategy, "strategy", STRATEGIES)
        one_of(self.unfreeze_unit, "unfreeze_unit", ("epoch", "step"))
        positive(self.head_lr_scale, "head_lr_scale")
        positive_int(self.unfreeze_every, "unfreeze_every")
        in_range(self.layer_lr_decay, "layer_lr_decay", 0.0, 1.0)
        require(self.layer_lr_decay > 0, "layer_lr_decay", "must be > 0")
        if self.strategy == "gradual" and self.unfreeze_unit == "epoch":
            require(
                self.unfreeze_every < self.train.epochs,
                "unfreeze_every",
                f"unfreezing every {self.unfreeze_every} epochs never unfreezes a layer in "
                f"{self.train.epochs} epochs (train.epochs)",
            )
        if self.n_train is not None:
            positive_int(self.n_train, "n_train")
        if self.weights is not None:
            require(str(self.weights).endswith(".safetensors"), "weights", "must be a .safetensors file")
            require(Path(self.weights).is_file(), "weights", f"file not found: {self.weights}")
        _check_max_length(self.max_length)


@dataclass
class TaskSpec:
    """One task of a multi-task model. ``data`` None means the recipe's own data (the primary task)."""

    name: str
    data: DataConfig | None = None
    num_labels: int | None = None  # None: the data's class count
    weight: float = 1.0  # the fixed loss weight (weighting: fixed) or GradNorm's initial weight

    def __post_init__(self):
        require(isinstance(self.name, str) and self.name.isidentifier(), "name", "must be an identifier")
        if self.num_labels is not None:
            positive_int(self.num_labels, "num_labels")
        positive(self.weight, "weight")


def _multitask_train() -> TrainConfig:
    return TrainConfig(epochs=3, batch_size=32, lr=5e-5, weight_decay=0.01, monitor="val_score")


@dataclass
class MultiTaskConfig:
    """One shared encoder, one head per task, trained on mixed batches.

    ``sampling``: each example of a batch is drawn from task ``t`` with
    probability proportional to ``n_t`` (``proportional``) or to
    ``n_t ** (1 / temperature)`` (``temperature``; larger flattens towards
    uniform). ``weighting``: ``fixed`` (``sum w_t L_t``), ``uncertainty``
    (Kendall et al. 2018) or ``gradnorm`` (Chen et al. 2018, asymmetry
    ``gradnorm_alpha``). An epoch is ``steps_per_epoch`` batches (None: all
    training examples once, on average).
    """

    tasks: list[TaskSpec]
    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"
    gradnorm_alpha: float = 1.5
    weighting_lr: float = 0.01  # learning rate of learned loss weights (uncertainty, gradnorm)
    head_lr_scale: float = 1.0  # the heads' learning rate is lr * head_lr_scale
    sampling: Literal["proportional", "temperature"] = "proportional"
    temperature: float = 2.0
    steps_per_epoch: int | None = None
    train: TrainConfig = field(default_factory=_multitask_train)
    head: HeadConfig = field(default_factory=HeadConfig)
    max_length: int | None = None

    def __post_init__(self):
        require(isinstance(self.tasks, list) and len(self.tasks) >= 2, "tasks", "needs at least two tasks")
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            require(
                task.name not in seen,
                f"tasks[{i}].name",
                f"{task.name!r} is already the name of tasks[{seen.get(task.name)}]",
            )
            seen[task.name] = i
        one_of(self.weighting, "weighting", ("fixed", "uncertainty", "gradnorm"))
        one_of(self.sampling, "sampling", ("proportional", "temperature"))
        non_negative(self.gradnorm_alpha, "gradnorm_alpha")
        positive(self.weighting_lr, "weighting_lr")
        positive(self.head_lr_scale, "head_lr_scale")
        positive(self.temperature, "temperature")
        require(
            self.head.num_labels is None, "head.num_labels", "set num_labels per task (tasks[i].num_labels)"
        )
        if self.steps_per_epoch is not None:
            positive_int(self.steps_per_epoch, "steps_per_epoch")
        _check_max_length(self.max_length)
