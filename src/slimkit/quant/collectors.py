"""Calibration collectors shared by several methods: objects with ``update(x)`` fed a layer's input.

A collector keeps only summaries of the inputs it sees (never all of them), so
calibration memory does not grow with the number of batches beyond a bounded
sample.
"""

from __future__ import annotations

import torch


class ChannelAbsMax:
    """Per-input-channel maximum of |x| over the calibration batches."""

    def __init__(self, channels: int):
        self.value = torch.zeros(channels)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float().abs().amax(dim=0)
        self.value = torch.maximum(self.value, flat)


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
        room = self.rows - self.kept_n
        if room > 0:
            step = max(1, x2.shape[0] // room)
            take = x2[::step][:room].clone()
            self.kept.append(take)
            self.kept_n += take.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.kept)
