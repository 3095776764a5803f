"""Training configuration.

Regularisation, stated plainly because frameworks disagree:

* ``l1``: a loss penalty ``l1 * sum(|w|)`` over weight matrices/kernels (not
  biases or norm parameters), added to the loss before back-propagation.
* ``l2``: a loss penalty ``l2 / 2 * sum(w**2)`` over the same weights. With
  plain SGD this equals coupled weight decay; with Adam it is scaled by the
  adaptive step like any other gradient.
* ``weight_decay``: handed to the optimizer. For ``adamw`` it is *decoupled*
  weight decay (Loshchilov & Hutter): ``w -= lr * wd * w`` outside the adaptive
  step. For ``sgd`` and ``adam`` PyTorch adds ``wd * w`` to the gradient, which
  is the coupled L2 form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from slimkit.config import in_range, non_negative, positive, positive_int, require


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    weight_decay: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = 0  # linear warm-up, then the schedule
    step_size: int = 10  # "step": epochs between decays
    gamma: float = 0.1  # "step": decay factor
    min_lr_ratio: float = 0.0  # "cosine": final lr as a fraction of lr
    early_stopping_patience: int | None = None  # epochs without improvement of `monitor`
    monitor: str | None = None  # a key of the validation metrics ("val_..."); None: the task's default
    restore_best: bool = True  # with validation data: end on the best epoch's weights
    max_steps: int | None = None  # stop after this many optimizer steps (for resume/partial runs)
    seed: int = 0
    progress: bool = True  # tqdm bar; False for scripts and tests

    def __post_init__(self):
        positive_int(self.epochs, "epochs")
        positive_int(self.batch_size, "batch_size")
        positive(self.lr, "lr")
        in_range(self.momentum, "momentum", 0.0, 1.0, hi_open=True)
        require(
            not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
            "nesterov",
            "needs optimizer 'sgd' with momentum > 0",
        )
        require(len(self.betas) == 2, "betas", "must be two numbers")
        for i, b in enumerate(self.betas):
            in_range(b, f"betas[{i}]", 0.0, 1.0, hi_open=True)
        for name in ("weight_decay", "l1", "l2", "warmup_steps", "min_lr_ratio"):
            non_negative(getattr(self, name), name)
        if self.grad_clip is not None:
            positive(self.grad_clip, "grad_clip")
        positive_int(self.step_size, "step_size")
        in_range(self.gamma, "gamma", 0.0, 1.0)
        in_range(self.min_lr_ratio, "min_lr_ratio", 0.0, 1.0)
        if self.early_stopping_patience is not None:
            positive_int(self.early_stopping_patience, "early_stopping_patience")
        require(
            self.monitor is None or (isinstance(self.monitor, str) and self.monitor.startswith("val_")),
            "monitor",
            "must name a validation metric such as val_loss",
        )
        if self.max_steps is not None:
            positive_int(self.max_steps, "max_steps")

    def for_task(self, task: str) -> TrainConfig:
        """This config with ``monitor`` set: the task's default metric when it is None (a copy, never in place)."""
        if self.monitor is not None:
            return self
        return dataclasses.replace(self, monitor=default_monitor(task))

    @property
    def monitor_mode(self) -> str:
        """Losses, errors and perplexities go down; everything else goes up."""
        lowered = ("loss", "mse", "error", "perplexity")
        return "min" if any(k in (self.monitor or "val_loss") for k in lowered) else "max"


# What a task's validation reports and what to keep the best epoch by when no monitor is given
# (slimkit.tasks.TaskAdapter.evaluate and slimkit.metrics.evaluate produce these; a test holds them equal).
VAL_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "loss"),
    "regression": ("mse", "pearson", "spearman"),
    "similarity": ("spearman", "pearson"),
}
DEFAULT_MONITOR = {
    "classification": "val_accuracy",
    "regression": "val_spearman",
    "similarity": "val_spearman",
}


def default_monitor(task: str | None) -> str:
    """val_accuracy for classification, val_spearman for regression and similarity, else val_loss."""
    return DEFAULT_MONITOR.get(task or "", "val_loss")
