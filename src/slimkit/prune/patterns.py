"""Which weights a score keeps: the shared mask shapes of unstructured pruning (True = keep).

Magnitude, Wanda and SparseGPT differ in their scores, not in how a score becomes a mask:
the smallest scores of a whole tensor, of every output row, or N kept of every M consecutive
inputs of each row. Ties go by position (stable sorts), so a mask is reproducible.
"""

from __future__ import annotations

import torch


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask removing exactly the ``k`` smallest scores of the whole tensor."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(scores.flatten(), stable=True)
        keep[order[:k]] = False
    return keep.view(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask removing the ``round(sparsity x columns)`` smallest scores of every row of a 2-D tensor."""
    k = round(sparsity * scores.shape[1])
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if k > 0:
        order = torch.argsort(scores, dim=1, stable=True)
        keep.scatter_(1, order[:, :k], False)
    return keep


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask keeping the ``n`` largest of every ``m`` consecutive scores of each row (columns % m == 0)."""
    rows = scores.reshape(scores.shape[0], -1)
    groups = rows.reshape(-1, m)
    # a stable sort, not topk: among equal scores (a group of zeros) the first ones are kept
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    keep = torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)
