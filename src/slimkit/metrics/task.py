"""Task metrics (accuracy, macro F1, correlations, perplexity) and model evaluation.

The metric functions take tensors, numpy arrays or lists and return plain
Python floats so that they go straight into reports and JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from slimkit.batch import Forward, default_forward, to_device
from slimkit.batch import targets as batch_targets
from slimkit.metrics.modes import eval_mode

TASKS = ("classification", "regression", "similarity")


def _array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def _labels(pred_or_logits: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class labels from predictions or logits (one more axis than the target)."""
    pred, target = _array(pred_or_logits), _array(target)
    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(axis=-1)
    pred, target = pred.reshape(-1), target.reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"predictions have {pred.shape[0]} items but targets have {target.shape[0]}")
    if target.size == 0:
        raise ValueError("no targets to score")
    return pred.astype(np.int64), target.astype(np.int64)


def accuracy(pred_or_logits: Any, target: Any) -> float:
    """Fraction of correct predictions; logits (N, C) are reduced by argmax first."""
    pred, target = _labels(pred_or_logits, target)
    return float((pred == target).mean())


def macro_f1(pred_or_logits: Any, target: Any) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in targets or predictions.

    A class that is predicted but never true scores F1 = 0 (as in scikit-learn's
    ``f1_score(average="macro")`` with ``zero_division=0``).
    """
    pred, target = _labels(pred_or_logits, target)
    scores = []
    for cls in np.union1d(pred, target):
        tp = np.sum((pred == cls) & (target == cls))
        fp = np.sum((pred == cls) & (target != cls))
        fn = np.sum((pred != cls) & (target == cls))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(a).astype(np.float64).reshape(-1), _array(b).astype(np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"correlation of {x.shape[0]} values with {y.shape[0]} values")
    if x.size < 2:
        raise ValueError("correlation needs at least 2 values")
    return x, y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    # Computed here rather than with scipy.stats, so that importing the metrics does not load scipy.
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan  # undefined for a constant input
    xm, ym = x - x.mean(), y - y.mean()
    r = float(np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)))
    return max(-1.0, min(1.0, r))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy.stats.rankdata's ``average``)."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[starts, x.size])
    average = starts + (counts + 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(average, counts)
    return ranks


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation in [-1, 1] (NaN when either input is constant or not finite)."""
    return _pearson(*_pair(a, b))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation in [-1, 1] (NaN when either input is constant or not finite)."""
    x, y = _pair(a, b)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return _pearson(_ranks(x), _ranks(y))


def perplexity(mean_nll: float) -> float:
    """exp of the mean negative log-likelihood per token (natural log)."""
    return float(math.exp(mean_nll))


def prediction(outputs: Any) -> torch.Tensor:
    """The prediction tensor inside a model's outputs (tensor, tuple, dict or ``.logits``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs:
        return prediction(outputs[0])
    raise TypeError(f"cannot find a prediction in model outputs of type {type(outputs).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(
    model: nn.Module, data_loader: Iterable, task: str, forward: Forward | None = None
) -> dict[str, float]:
    """Score ``model`` on every batch of ``data_loader``.

    classification: ``accuracy``, ``macro_f1``, ``loss`` (mean cross-entropy).
    regression / similarity: ``mse``, ``pearson``, ``spearman`` of predictions vs targets.
    ``forward(model, batch) -> outputs`` adapts other batch layouts (outputs may be a tensor, a
    tuple whose first item is the prediction, or an object/dict with ``logits``); targets are
    read by :func:`slimkit.batch.targets`.
    The model runs in eval mode under ``torch.no_grad``; every module's
    train/eval flag is restored afterwards.
    """
    if task not in TASKS:
        raise ValueError(f"task: must be one of {', '.join(TASKS)}; got {task!r}")
    forward = forward or default_forward
    device = _model_device(model)
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    # no_grad rather than inference_mode: a buffer a model caches lazily during this
    # pass would otherwise become an inference tensor that later training cannot use.
    with eval_mode(model), torch.no_grad():
        for batch in data_loader:
            batch = to_device(batch, device)
            outputs, target = forward(model, batch), batch_targets(batch)
            preds.append(prediction(outputs).detach().float().cpu())
            targets.append(torch.as_tensor(target).detach().cpu())
    if not preds:
        raise ValueError("evaluate: the data loader yielded no batches")
    return score_predictions(task, preds, targets)


def score_predictions(task: str, preds: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, float]:
    """The metrics of ``evaluate`` from per-batch predictions and targets."""
    if task == "classification":
        pred = torch.cat([p.reshape(-1, p.shape[-1]) for p in preds])
        target = torch.cat([t.reshape(-1) for t in targets])
        return {
            "accuracy": accuracy(pred, target),
            "macro_f1": macro_f1(pred, target),
            "loss": float(F.cross_entropy(pred, target.long())),
        }
    pred = torch.cat([p.reshape(-1) for p in preds])
    target = torch.cat([t.reshape(-1) for t in targets]).float()
    if pred.shape != target.shape:
        raise ValueError(f"regression outputs have {pred.numel()} values for {target.numel()} targets")
    return {
        "mse": float(F.mse_loss(pred, target)),
        "pearson": pearson(pred, target),
        "spearman": spearman(pred, target),
    }
