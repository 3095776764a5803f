"""Calibration collectors shared by several methods: objects with ``update(x)`` fed a layer's input.

A collector keeps only summaries of the inputs it sees (never all of them), so
calibration memory does not grow with the number of batches beyond a bounded
sample.

Under torchrun a collector's ``all_reduce_(env)`` makes every rank hold the
statistics of all ranks' data (see :mod:`slimkit.quant.distributed`).
"""

from __future__ import annotations

import torch

from slimkit.train.distributed import DistEnv, all_reduce_tensor_, gather_objects, sum_across


class ChannelAbsMax:
    """Per-input-channel maximum of |x| over the calibration batches."""

    def __init__(self, channels: int):
        self.value = torch.zeros(channels)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float().abs().amax(dim=0)
        self.value = torch.maximum(self.value, flat)

    def all_reduce_(self, env: DistEnv | None) -> None:
        all_reduce_tensor_(self.value, env, "max")


class ActivationSample:
    """Mean absolute value of each input channel, and a bounded, evenly spread sample of input rows."""

    def __init__(self, in_features: int, rows: int):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0
        self.rows = rows
        self.kept: list[torch.Tensor] = []
        self.kept_n = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x2.abs().sum(dim=0).double()
        self.n += x2.shape[0]
        self._keep(x2)

    def _keep(self, x2: torch.Tensor) -> None:
        room = self.rows - self.kept_n
        if room > 0:
            step = max(1, x2.shape[0] // room)
            take = x2[::step][:room].clone()
            self.kept.append(take)
            self.kept_n += take.shape[0]

    def all_reduce_(self, env: DistEnv | None) -> None:
        """Sums summed; the row samples gathered and kept again within ``rows``, in global batch order.

        Each rank keeps one chunk per batch; with rank-strided shares, chunk ``i`` of rank
        ``r`` came from global batch ``i * world + r``, so interleaving the chunks and
        keeping them again under the same budget gives the one-process sample whenever
        the budget held every row (or the batches came whole), and an evenly spread,
        deterministic one otherwise.
        """
        if env is None:
            return
        all_reduce_tensor_(self.abs_sum, env)
        self.n = int(sum_across([float(self.n)], env)[0])
        chunks = gather_objects(self.kept, env)
        self.kept, self.kept_n = [], 0
        for i in range(max(len(c) for c in chunks)):
            for rank_chunks in chunks:
                if i < len(rank_chunks):
                    self._keep(rank_chunks[i])

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.kept)
