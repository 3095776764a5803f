"""What a recipe step sees: the model, its data and task, and the shared tools.

Steps from every technique family use ``ctx.train`` (the one training loop with
the task's forward, loss and collate) and ``ctx.calibration_batches`` (real
inputs for activation statistics), and may replace ``ctx.saver`` when their
model is stored differently (sparse or packed weights), so that the size in
the report is always the size of the file actually written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.batch import batch_len
from slimkit.data.base import DataBundle
from slimkit.tasks import TaskAdapter
from slimkit.train import Callback, TrainConfig, Trainer, TrainResult
from slimkit.utils.io import save_weights

Saver = Callable[[nn.Module, Path], int]


@dataclass
class RunContext:
    model: nn.Module
    data: DataBundle
    task: TaskAdapter
    run_dir: Path
    log: logging.Logger
    tokenizer: Any = None
    progress: bool = True
    seed: int = 0
    saver: Saver = save_weights
    weights_name: str = "model.safetensors"
    notes: dict = field(default_factory=dict)  # per-step extras that go into the report row

    def train(
        self, config: TrainConfig, callbacks: Sequence[Callback] = (), val: bool = True, loss_fn=None
    ) -> TrainResult:
        """Train ``self.model`` in place with the recipe's task, on the train split."""
        config.progress = config.progress and self.progress
        trainer = Trainer(
            self.model,
            config,
            callbacks=callbacks,
            forward=self.task.forward,
            loss_fn=loss_fn or self.task.loss_fn,
            task=self.task.task,
            collate_fn=self.task.collate_fn,
            evaluate=(lambda m: self.task.evaluate(m, self.data.val)) if val and self.data.val else None,
        )
        return trainer.fit(self.data.train, self.data.val if val else None)

    def calibration_batches(self, n_samples: int, batch_size: int = 32, split: str = "train") -> list[Any]:
        """Model inputs (no targets) from the start of a split, for calibration."""
        dataset = getattr(self.data, split)
        loader = self.task.loader(dataset, batch_size)
        out, seen = [], 0
        for batch in loader:
            out.append(batch)
            seen += batch_len(batch)
            if seen >= n_samples:
                break
        return out
