"""The Python API: ``distill_(student, teacher, data, ...)`` on the training core's one loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.batch import text_inputs
from slimkit.distill.callback import DistillationCallback, output_tensors
from slimkit.distill.config import DistillConfig
from slimkit.train.callbacks import Callback
from slimkit.train.config import TrainConfig
from slimkit.train.trainer import Trainer, TrainResult


@dataclass
class DistillResult:
    """What :func:`distill_` did to the student.

    ``losses`` holds the last epoch's sample-weighted mean of each distillation
    term, named as in ``train.history`` (``distill_output``, ``distill_hidden``,
    ``distill_attention``, ``distill_task``).
    """

    train: TrainResult
    teacher_params: int
    student_params: int
    losses: dict[str, float] = field(default_factory=dict)


def no_label_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """A zero task loss (still attached to the graph) for unlabeled data: only the teacher teaches."""
    return sum(t.sum() for t in output_tensors(outputs)) * 0.0


def sentence_collate(tokenizer: Callable, max_length: int = 128) -> Callable[[list], dict]:
    """Tokenize unlabeled rows (``{"text": ...}`` dicts or plain strings) for embedding distillation."""

    def collate(rows: Sequence) -> dict[str, torch.Tensor]:
        texts = [r if isinstance(r, str) else r["text"] for r in rows]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return text_inputs(enc)

    return collate


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset,
    config: DistillConfig,
    train: TrainConfig,
    val_data: Dataset | None = None,
    task: str = "classification",
    forward: Callable | None = None,
    loss_fn: Callable | None = None,
    collate_fn: Callable | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    callbacks: Sequence[Callback] = (),
) -> DistillResult:
    """Train ``student`` in place towards ``teacher`` (left unchanged).

    Before any weight changes, both models run once on the first training
    batch, so unmatched outputs, missing layers and widths without a
    projection fail fast. ``loss_fn`` is the task (hard-label) loss; for data
    without labels pass :func:`no_label_loss` with ``alpha=1``.
    """
    cb = DistillationCallback(teacher, config, forward=forward)
    first = next(iter(DataLoader(train_data, batch_size=min(train.batch_size, 8), collate_fn=collate_fn)))
    cb.check(student, first)
    trainer = Trainer(
        student,
        train,
        callbacks=[cb, *callbacks],
        forward=forward,
        loss_fn=loss_fn,
        task=task,
        collate_fn=collate_fn,
        evaluate=evaluate,
    )
    result = trainer.fit(train_data, val_data)
    last = result.history[-1] if result.history else {}
    return DistillResult(
        train=result,
        teacher_params=_count(teacher),
        student_params=_count(student),
        losses={k: v for k, v in last.items() if k.startswith("distill_")},
    )


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
