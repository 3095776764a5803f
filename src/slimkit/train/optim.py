"""Optimizers and learning-rate schedules.

The schedule is a pure function of the global step so that a resumed run
continues with exactly the learning rate it would have had.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimkit.train.config import TrainConfig


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups: list[dict] | None = None
) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, or over ``param_groups`` when given.

    Param groups (``params`` as lists) are taken as given (frozen parameters in them are kept, so that
    a callback may unfreeze them later) and may carry an ``lr_scale``: the
    group's learning rate is ``cfg.lr * lr_scale`` times the schedule.
    """
    params: list = [p for p in model.parameters() if p.requires_grad]
    if param_groups is not None:
        params = [g for g in param_groups if len(g["params"]) > 0]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // max(steps_per_epoch, 1)) // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weight matrices and kernels: biases and norm scales are not regularised."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def regularization(model: nn.Module, cfg: TrainConfig) -> torch.Tensor | None:
    if not (cfg.l1 or cfg.l2):
        return None
    weights = penalized_weights(model)
    total = weights[0].new_zeros(())
    if cfg.l1:
        total = total + cfg.l1 * sum(w.abs().sum() for w in weights)
    if cfg.l2:
        total = total + 0.5 * cfg.l2 * sum(w.pow(2).sum() for w in weights)
    return total
