"""Hooks into the one training loop.

Techniques extend training by subclassing :class:`Callback`, never by copying
the loop: pruning re-applies masks in ``on_step_end``, distillation adds a loss
term in ``on_loss``, quantization-aware training swaps modules in
``on_train_begin``. Every hook receives the :class:`Trainer` (model,
optimizer, state) and may read or change it.
"""

from __future__ import annotations

from typing import Any

import torch

# The hooks receive the Trainer; it is not imported here because trainer.py imports this
# module (a typing-only import back would still be an import cycle).
Trainer = Any


class Callback:
    """Override the hooks you need; every hook is a no-op by default."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_epoch_begin(self, trainer: Trainer) -> None: ...

    def on_loss(self, trainer: Trainer, batch: Any, outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to back-propagate (add distillation or penalty terms here)."""
        return loss

    def on_after_backward(self, trainer: Trainer) -> None:
        """Gradients exist and are not yet clipped nor applied (mask gradients here)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """The optimizer has stepped (re-apply pruning masks here)."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        """JSON-serialisable state saved in checkpoints for exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None: ...
