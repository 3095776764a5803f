"""The one shape every data set takes inside slimkit.

Tensor data (images, arrays) are ``TensorDataset(x, y)``; text data are
``TextDataset`` rows (dicts with ``text``, optional ``text_pair``, and
``label`` or ``score``) that a model adapter tokenizes at collate time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

Task = Literal["classification", "regression", "similarity", "language_modeling"]


class TextDataset(Dataset):
    """Rows of ``{"text": str, "text_pair": str | None, "label": int | "score": float}``."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class DataBundle:
    """Train/validation/test splits of one data set plus what a model needs to know."""

    name: str
    task: Task
    train: Dataset
    test: Dataset
    val: Dataset | None = None
    num_classes: int | None = None
    input_kind: Literal["tensor", "text"] = "tensor"
    input_shape: tuple[int, ...] | None = None  # one sample, without the batch axis
    label_names: list[str] | None = None
    info: dict = field(default_factory=dict)  # provenance: files, split sizes, seed

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of real inputs (for MACs, latency, calibration) from the test split."""
        if self.input_kind != "tensor":
            raise TypeError(f"{self.name}: text data has no tensor example input")
        n = min(batch_size, len(self.test))
        return torch.stack([self.test[i][0] for i in range(n)])


def split_indices(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Deterministic shuffled split of ``range(n)`` into parts of the given fractions."""
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + [round(f * n) for f in fractions[:-1]])
    parts = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    parts.append(order[bounds[-1] :])
    return parts
