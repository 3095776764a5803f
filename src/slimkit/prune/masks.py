"""Unstructured masks and the callback that keeps masked weights at exactly zero while training.

Masks live in a :class:`Masks` object (parameter name -> bool tensor) rather
than as buffers or parametrizations, so the model's state dict and forward stay
those of an ordinary module; :class:`MaskCallback` keeps pruned weights at
zero while the Trainer runs (gradients masked after backward, weights
re-masked after every optimizer step, which also cancels momentum and weight
decay that would otherwise revive them).
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.train.callbacks import Callback


class Masks(dict):
    """``{parameter name: bool mask}``; True keeps the weight."""

    def apply_(self, model: nn.Module) -> nn.Module:
        with torch.no_grad():
            for name, mask in self.items():
                # masked_fill, not mul: w * 0 would leave -0.0, which costs space in sparse files.
                model.get_parameter(name).masked_fill_(~mask, 0.0)
        return model

    def mask_grads_(self, model: nn.Module) -> None:
        for name, mask in self.items():
            grad = model.get_parameter(name).grad
            if grad is not None:
                grad.masked_fill_(~mask, 0.0)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.values())
        return 1.0 - sum(int(m.sum()) for m in self.values()) / max(total, 1)

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.float().mean()) for n, m in self.items()}


class MaskCallback(Callback):
    """Keeps pruned weights at exactly zero during training (works with momentum and weight decay)."""

    def __init__(self, masks: Masks):
        self.masks = masks

    def on_train_begin(self, trainer) -> None:
        self.masks.apply_(trainer.model)

    def on_after_backward(self, trainer) -> None:
        self.masks.mask_grads_(trainer.model)

    def on_step_end(self, trainer) -> None:
        self.masks.apply_(trainer.model)
