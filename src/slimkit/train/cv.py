"""k-fold cross-validation on top of the one training loop."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import Dataset, Subset

from slimkit.config import require
from slimkit.train.config import TrainConfig
from slimkit.train.trainer import Trainer


@dataclass
class CVResult:
    folds: list[dict]  # validation metrics of each fold's best epoch (or last epoch)
    mean: dict[str, float]
    std: dict[str, float]


def cross_validate(
    make_model: Callable[[], nn.Module],
    dataset: Dataset,
    config: TrainConfig,
    k: int = 5,
    labels: np.ndarray | None = None,
    task: str = "classification",
    **trainer_kwargs,
) -> CVResult:
    """Train a fresh model on each of ``k`` folds and score it on the held-out fold.

    With ``labels`` the folds are stratified, which keeps every class in every
    fold. The split depends only on ``config.seed``.
    """
    require(isinstance(k, int) and k >= 2, "k", "must be an integer >= 2")
    require(len(dataset) >= k, "k", f"is larger than the data set ({len(dataset)} samples)")
    # Imported here: scikit-learn (and the scipy it loads) is only needed for k-fold splits,
    # not by everything that imports the training core.
    from sklearn.model_selection import KFold, StratifiedKFold

    idx = np.arange(len(dataset))
    if labels is not None:
        splits = StratifiedKFold(k, shuffle=True, random_state=config.seed).split(idx, labels)
    else:
        splits = KFold(k, shuffle=True, random_state=config.seed).split(idx)
    folds = []
    for train_idx, val_idx in splits:
        trainer = Trainer(make_model(), config, task=task, **trainer_kwargs)
        result = trainer.fit(Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist()))
        best = result.best_epoch or len(result.history)
        folds.append({k_: v for k_, v in result.history[best - 1].items() if k_.startswith("val_")})
    keys = folds[0].keys()
    mean = {key: statistics.fmean(f[key] for f in folds) for key in keys}
    std = {key: statistics.pstdev(f[key] for f in folds) for key in keys}
    return CVResult(folds=folds, mean=mean, std=std)
