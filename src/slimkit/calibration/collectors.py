"""Statistics of a layer's inputs gathered during calibration: objects with ``update(x)`` and ``all_reduce_(env)``.

A collector is fed the input ``x`` of one layer (any shape, features last; the
rows are the flattened leading dimensions) and keeps only a summary of it, so
memory does not grow with the number of batches. Under ``torchrun`` each
process sees its own share of the batches; ``all_reduce_(env)`` makes every
process hold the statistics of all of them, equal to what one process would
have gathered on every batch (up to float summation order).
"""

from __future__ import annotations

from typing import Any

import torch

from slimkit.errors import DataError
from slimkit.train.distributed import DistEnv, all_reduce_tensor_, sum_across

_ROWS_PER_UPDATE = 4096

Collectors = dict[str, dict[str, Any]]  # {layer name: {key: collector}}


class HessianAccumulator:
    """Running ``2/n * X^T X`` of a layer's inputs (rows of the flattened activations): GPTQ, SparseGPT."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        total = self.n + x2.shape[0]
        self.h.mul_(self.n / total)
        # In row chunks: a float64 copy of a whole calibration batch (32 x 1024 tokens x 1536) is 400 MB.
        for i in range(0, x2.shape[0], _ROWS_PER_UPDATE):
            rows = x2[i : i + _ROWS_PER_UPDATE].double()
            self.h.add_(rows.t() @ rows, alpha=2.0 / total)
        self.n = total

    def hessian(self) -> torch.Tensor:
        """``h`` rounded to float32 (kept as float64 for GPTQ's arithmetic).

        The sum's last float64 bits depend on the order the rows were added in (one
        process, or several merged by :meth:`all_reduce_`); rounding them off makes GPTQ
        build the same codes either way, so true-sequential stages, each calibrated on
        the layers before it, stay identical too. 24 bits are far finer than the
        calibration sample's own noise.
        """
        return self.h.float().double()

    def all_reduce_(self, env: DistEnv | None) -> None:
        """Under torchrun: every rank's ``h`` becomes that of all ranks' rows (``2 X^T X``, ``n`` summed)."""
        if env is None:
            return
        total = all_reduce_tensor_(self.h * self.n, env)
        self.n = int(sum_across([float(self.n)], env)[0])
        self.h = total / max(self.n, 1)


class InputNorm:
    """Per-input-channel L2 norm of a layer's inputs over every row seen: Wanda's ``||X_j||_2``.

    Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
    (2023) score weight ``W_ij`` by ``|W_ij| * ||X_j||_2``, the norm over all
    ``N x L`` calibration tokens. The squares are summed in float64, so the sum
    does not depend on how the rows were split into batches (or processes) beyond
    float64 rounding, and :meth:`norm` rounds to float32.
    """

    def __init__(self, in_features: int):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        for i in range(0, x2.shape[0], _ROWS_PER_UPDATE):  # bounded float64 copies, as in HessianAccumulator
            self.sq_sum += x2[i : i + _ROWS_PER_UPDATE].double().pow(2).sum(dim=0)
        self.n += x2.shape[0]

    def norm(self) -> torch.Tensor:
        """``sqrt(sum over rows of x_j^2)`` per input channel ``j`` (float32)."""
        return self.sq_sum.sqrt().float()

    def rms(self) -> torch.Tensor:
        """``sqrt(mean over rows of x_j^2)``: the norm divided by ``sqrt(rows)`` (same ranking within a layer)."""
        return (self.sq_sum / max(self.n, 1)).sqrt().float()

    def all_reduce_(self, env: DistEnv | None) -> None:
        """Under torchrun: the squares and the row counts summed over the ranks."""
        if env is None:
            return
        all_reduce_tensor_(self.sq_sum, env)
        self.n = int(sum_across([float(self.n)], env)[0])


def all_reduce_collectors_(collectors: Collectors, env: DistEnv | None) -> None:
    """Merge every collector across the ranks (every rank calls this with the same layers, in order)."""
    if env is None:
        return
    for found in collectors.values():
        for collector in found.values():
            collector.all_reduce_(env)


def require_fed(collectors: Collectors, hint: str = "") -> None:
    """Refuse to build layers whose calibration collectors saw no input (naming the first few)."""
    missing = [
        name
        for name, found in collectors.items()
        if any(getattr(c, "batches", 1) == 0 or getattr(c, "n", 1) == 0 for c in found.values())
    ]
    if missing:
        raise DataError(f"layers saw no input during calibration: {', '.join(missing[:5])}{hint}")


def inverse_hessian_factor_(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(h + damp x mean(diag h) I)^-1``, computed in ``h``'s own memory.

    GPTQ and SparseGPT sweep the columns with it. In place (``out=h``, the same numbers as
    fresh results): each of the three steps would otherwise leave a ``K x K`` float64 matrix
    alive, 19 MB apiece for a 1536-wide down projection, at the peak of block-by-block calibration.
    """
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * torch.mean(torch.diag(h)).clamp(min=1e-8)
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    return torch.linalg.cholesky(h, upper=True, out=h)
