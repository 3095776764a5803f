"""How a model meets its data: batching, forward, loss, evaluation and inputs to time.

One :class:`TaskAdapter` serves training (the Trainer's ``forward``/``loss_fn``
/``collate_fn``), evaluation (the report's task metric) and measurement (an
example batch for MACs and latency), so every step of a recipe scores the
model the same way.

For ``similarity`` (sentence pairs with a gold score, as STS-B) the model is a
sentence encoder: both sentences are embedded separately and the metric is
the Spearman correlation (x100, the usual STS-B scale) between their cosine
similarity and the gold score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.batch import call_model, default_forward, model_inputs, pair_inputs
from slimkit.data.base import DataBundle
from slimkit.metrics.modes import eval_mode
from slimkit.metrics.task import evaluate as evaluate_metrics
from slimkit.metrics.task import pearson, spearman
from slimkit.train.trainer import classification_loss, regression_loss

PRIMARY = {
    "classification": ("accuracy", True),
    "regression": ("spearman", True),
    "similarity": ("spearman", True),
}


def text_forward(model: nn.Module, batch: dict) -> Any:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else out


def pair_forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return model(**model_inputs(batch)), model(**pair_inputs(batch))


def cosine_score_loss(outputs: tuple[torch.Tensor, torch.Tensor], batch: dict) -> torch.Tensor:
    """MSE between the pair's cosine similarity and the gold score scaled to [0, 1] (STS-B is 0..5)."""
    cos = nn.functional.cosine_similarity(outputs[0], outputs[1])
    return nn.functional.mse_loss(cos, batch["scores"] / 5.0)


@dataclass
class TaskAdapter:
    task: str
    forward: Callable[[nn.Module, Any], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    collate_fn: Callable | None = None
    batch_size: int = 256

    @property
    def metric(self) -> str:
        return PRIMARY[self.task][0]

    @property
    def higher_is_better(self) -> bool:
        return PRIMARY[self.task][1]

    def loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, collate_fn=self.collate_fn)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Task metrics on ``dataset``; the model's mode is restored afterwards."""
        if self.task == "similarity":
            return self._similarity(model, dataset)
        return evaluate_metrics(model, self.loader(dataset), self.task, forward=self.forward)

    def _similarity(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        cos, gold = [], []
        with eval_mode(model), torch.inference_mode():
            for batch in self.loader(dataset, 64):
                a, b = self.forward(model, batch)
                cos.append(nn.functional.cosine_similarity(a.float(), b.float()))
                gold.append(batch["scores"])
        cos_all, gold_all = torch.cat(cos), torch.cat(gold)
        return {"spearman": 100 * spearman(cos_all, gold_all), "pearson": 100 * pearson(cos_all, gold_all)}

    def example_batch(self, dataset: Dataset, batch_size: int) -> Any:
        """Model inputs of one real batch: what latency and MACs are measured on."""
        return model_inputs(next(iter(self.loader(dataset, batch_size))))

    @staticmethod
    def call(model: nn.Module, inputs: Any) -> Any:
        return call_model(model, inputs)


def build_task(data: DataBundle, tokenizer=None, max_length: int = 128) -> TaskAdapter:
    if data.input_kind == "tensor":
        loss = regression_loss if data.task == "regression" else classification_loss
        return TaskAdapter(data.task, default_forward, loss)
    if tokenizer is None:
        raise ValueError(f"{data.name}: text data needs a model with a tokenizer (a Hugging Face model)")
    from slimkit.data.loaders import text_collate

    collate = text_collate(tokenizer, max_length=max_length, pairs="separate")
    if data.task == "similarity":
        return TaskAdapter("similarity", pair_forward, cosine_score_loss, collate, batch_size=64)
    loss = regression_loss if data.task == "regression" else classification_loss
    return TaskAdapter(data.task, text_forward, loss, collate, batch_size=64)
