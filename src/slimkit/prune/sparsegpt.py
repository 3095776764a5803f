"""SparseGPT and Wanda on one Linear weight: the masks and, for SparseGPT, the compensating update.

* Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023):
  score ``|W_ij| x ||X_j||_2`` (the weight times the L2 norm of its input channel over the
  calibration tokens), the lowest scores of every output row pruned; nothing else changes.
* SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", 2023): with ``H = 2 X^T X``, the columns are swept left to right like GPTQ's; each
  pruned weight's error is pushed onto the columns not yet visited through the inverse Hessian's
  upper Cholesky factor, so the layer's output ``X W^T`` moves as little as possible. The mask
  is chosen per block of ``block_size`` columns from ``w^2 / diag(U)^2`` (the OBS saliency on the
  weights as the earlier columns' updates left them), or every M columns for N:M.

Both take only the weight and a statistic of its inputs, so they run the same whether the
statistics came from one pass over the whole model or from block-by-block calibration.
"""

from __future__ import annotations

import torch

from slimkit.calibration.collectors import inverse_hessian_factor_
from slimkit.prune.patterns import n_m_mask, row_mask, smallest_mask


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| x ||X_j||``: only the ranking within a row matters, so any positive scale of the norm works."""
    return weight.detach().abs().float() * input_norm.float().reshape(1, -1)


def wanda_mask(
    weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float | None, n_m: tuple[int, int] | None
) -> torch.Tensor:
    """Wanda's mask (True = keep) of a ``[out, in]`` weight: per row at ``sparsity``, or N kept of every M."""
    scores = wanda_scores(weight, input_norm)
    return n_m_mask(scores, *n_m) if n_m is not None else row_mask(scores, sparsity)


def _block_prune_counts(n_out: int, k: int, block_size: int, sparsity: float) -> list[int]:
    """Weights to prune in each column block, so that the layer's total is exactly ``round(sparsity x n)``."""
    counts, done = [], 0
    for i2 in range(block_size, k + block_size, block_size):
        target = round(sparsity * n_out * min(i2, k))
        counts.append(target - done)
        done = target
    return counts


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new weight, mask)`` of a ``[out, in]`` weight; the new weight is exactly zero where the mask is False.

    ``sparsity``: the fraction of the layer's weights pruned (exactly ``round(sparsity x numel)``,
    chosen block by block); ``n_m = (n, m)``: ``n`` kept of every ``m`` consecutive inputs of each row.
    """
    w = weight.detach().double().clone()
    n_out, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that are always zero: their columns do not matter
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor_(h, damp)
    if n_m is not None:
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])  # N:M groups never straddle blocks
        counts = None
    else:
        counts = _block_prune_counts(n_out, k, block_size, sparsity)
    keep = torch.ones(n_out, k, dtype=torch.bool)
    for b, i1 in enumerate(range(0, k, block_size)):
        i2 = min(i1 + block_size, k)
        hinv1 = hinv[i1:i2, i1:i2]
        w1 = w[:, i1:i2].clone()
        if counts is not None:
            keep[:, i1:i2] = smallest_mask(w1.pow(2) / torch.diag(hinv1).pow(2), counts[b])
        err1 = _sweep_block(w1, hinv1, keep[:, i1:i2], n_m)
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.masked_fill(~keep, 0.0).to(weight.dtype), keep


def _sweep_block(
    w1: torch.Tensor, hinv1: torch.Tensor, keep1: torch.Tensor, n_m: tuple[int, int] | None
) -> torch.Tensor:
    """One block's columns in turn (``w1`` and, for N:M, ``keep1`` updated in place); returns the errors.

    Each column's pruned weights are zeroed and the error, scaled by the factor's diagonal, is
    pushed onto the block's later columns; the caller pushes the block's errors beyond it.
    """
    err1 = torch.zeros_like(w1)
    for i in range(w1.shape[1]):
        if n_m is not None and i % n_m[1] == 0:
            group = slice(i, i + n_m[1])
            saliency = w1[:, group].pow(2) / torch.diag(hinv1)[group].pow(2)
            keep1[:, group] = n_m_mask(saliency, *n_m)
        col = w1[:, i]
        err = (col - col.masked_fill(~keep1[:, i], 0.0)) / hinv1[i, i]
        w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
        err1[:, i] = err
    return err1
