"""How a model meets its data: batching, forward, loss, evaluation and inputs to time.

One :class:`TaskAdapter` serves training (the Trainer's ``forward``/``loss_fn``
/``collate_fn``), evaluation (the report's task metric) and measurement (an
example batch for MACs and latency), so every step of a recipe scores the
model the same way.

For ``similarity`` (sentence pairs with a gold score, as STS-B) the model is a
sentence encoder: both sentences are embedded separately and the metric is
the Spearman correlation (x100, the usual STS-B scale) between their cosine
similarity and the gold score.

For ``language_modeling`` (token windows of a causal LM, :mod:`slimkit.data.lm`)
the loss is the next-token cross-entropy and the metric is perplexity, by the
one protocol of :mod:`slimkit.metrics.lm` (``seq_len``, ``stride`` and the
number of scored tokens come with every figure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.batch import call_model, default_forward, first_output, model_inputs, pair_inputs
from slimkit.data.base import DataBundle
from slimkit.errors import DataError, ModelError
from slimkit.metrics.lm import evaluate_perplexity, next_token_loss
from slimkit.metrics.modes import eval_mode
from slimkit.metrics.task import evaluate as evaluate_metrics
from slimkit.metrics.task import pearson, spearman
from slimkit.train.trainer import classification_loss, regression_loss

PRIMARY = {
    "classification": ("accuracy", True),
    "regression": ("spearman", True),
    "similarity": ("spearman", True),
    "language_modeling": ("perplexity", False),
}
LM_TASK = "language_modeling"


def text_forward(model: nn.Module, batch: dict) -> Any:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else out


def pair_forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return model(**model_inputs(batch)), model(**pair_inputs(batch))


def lm_loss(outputs: Any, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy over the window's scored positions (``labels`` != -100)."""
    return next_token_loss(outputs.logits if hasattr(outputs, "logits") else outputs, batch["labels"])


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
    example_size: int | None = None  # most samples in the batch that latency/MACs are measured on

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
        if self.task == LM_TASK:
            return evaluate_perplexity(model, dataset, forward=self.forward)
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
        size = min(batch_size, self.example_size or batch_size)
        return model_inputs(next(iter(self.loader(dataset, size))))

    @staticmethod
    def call(model: nn.Module, inputs: Any) -> Any:
        return call_model(model, inputs)

    def one_call(self, model: nn.Module, batch: Any) -> Any:
        """The model's main output, called once on a batch (a sentence-pair batch: its first
        sentences): what a graph trace needs, where a pair task's ``forward`` calls the model twice."""
        if self.task == "similarity":
            return first_output(call_model(model, model_inputs(batch)))
        return self.forward(model, batch)


def build_task(data: DataBundle, tokenizer=None, max_length: int = 128) -> TaskAdapter:
    if data.input_kind == "tensor":
        loss = regression_loss if data.task == "regression" else classification_loss
        return TaskAdapter(data.task, default_forward, loss)
    if tokenizer is None:
        raise ModelError(f"model: text data {data.name!r} needs a model with a tokenizer (model.hf: ...)")
    if data.task == LM_TASK:
        # One window is the example: a batch of 64 windows of 1024 tokens would time minutes per call.
        return TaskAdapter(LM_TASK, text_forward, lm_loss, None, batch_size=8, example_size=1)
    from slimkit.data.loaders import text_collate

    # Similarity embeds each sentence apart (bi-encoder); a classifier or regressor on pairs reads
    # both as one [CLS] a [SEP] b [SEP] input (the pair is never dropped).
    pairs = "separate" if data.task == "similarity" else "joint"
    collate = text_collate(tokenizer, max_length=max_length, pairs=pairs)
    if data.task == "similarity":
        return TaskAdapter("similarity", pair_forward, cosine_score_loss, collate, batch_size=64)
    loss = regression_loss if data.task == "regression" else classification_loss
    return TaskAdapter(data.task, text_forward, loss, collate, batch_size=64)


def check_labels_fit(model: nn.Module, data: DataBundle, task: TaskAdapter) -> None:
    """Before any step: a classifier needs an output for every label in the data.

    Otherwise training dies deep in the loss (``IndexError: Target 8 is out of bounds``)
    and evaluation quietly scores a label no output can predict. One 2-sample forward
    pass tells the model's number of outputs.
    """
    if data.task != "classification" or not data.num_classes or len(data.test) == 0:
        return
    outputs = _num_outputs(model, data, task)
    if outputs is None or outputs >= data.num_classes:
        return
    where = data.info.get("file") or data.info.get("folder") or data.name
    label, count = _labels_beyond(data, outputs)
    raise DataError(
        f"{where}: label {label} is beyond the model's {outputs} outputs (classes 0..{outputs - 1}); "
        f"{count} samples have a label the model cannot predict: build the model for "
        f"{data.num_classes} classes (model.kwargs.num_classes) or fix the labels"
    )


def _num_outputs(model: nn.Module, data: DataBundle, task: TaskAdapter) -> int | None:
    # fork_rng: starting a DataLoader draws from the global generator, and a check must not
    # move the seeded run's later draws (head init, dropout, shuffling) by one number.
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(task.loader(data.test, 2)))
    try:
        with eval_mode(model), torch.inference_mode():
            out = task.forward(model, batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:  # the model cannot take these inputs
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelError(f"model: cannot run on the inputs of data {data.name!r}: {first}") from None
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2:
        return None  # not a classifier's (batch, classes) output: nothing to compare
    return int(logits.shape[-1])


def _labels_beyond(data: DataBundle, outputs: int) -> tuple[str, int]:
    """The largest label (by its name when the data has names) and how many samples are >= ``outputs``."""
    labels = []
    for split in (data.train, data.val, data.test):
        if split is None:
            continue
        if hasattr(split, "tensors"):
            labels.append(split.tensors[1].reshape(-1).long())
        elif hasattr(split, "rows"):
            labels.append(torch.tensor([int(r["label"]) for r in split.rows], dtype=torch.long))
    every = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    top = int(every.max()) if every.numel() else data.num_classes - 1
    names = data.label_names
    shown = f"{names[top]!r} (class {top})" if names and names[top] != str(top) else str(top)
    return shown, int((every >= outputs).sum())
