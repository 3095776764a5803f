"""How the per-task losses of a multi-task model become one loss.

* :class:`FixedWeighting`: ``sum_t w_t L_t``.
* :class:`UncertaintyWeighting` (Kendall, Gal & Cipolla, CVPR 2018): each task
  learns ``s_t = log sigma_t^2`` and the loss is
  ``sum_t c_t exp(-s_t) L_t + s_t / 2`` with ``c_t = 1`` for classification
  (``L_t / sigma^2 + log sigma``) and ``1/2`` for regression
  (``L_t / (2 sigma^2) + log sigma``). Noisy tasks get a large sigma and a
  small weight; the ``s_t / 2`` term stops sigma from growing without bound.
* :class:`GradNorm` (Chen et al., ICML 2018): task weights ``w_t`` are learned
  so that the gradient norm ``G_t = ||grad_W w_t L_t||`` on the last shared
  layer ``W`` approaches ``mean(G) * r_t^alpha``, where ``r_t`` is the task's
  relative inverse training rate ``(L_t / L_t(0)) / mean(L / L(0))``. The
  network receives the gradient of ``sum_t w_t L_t`` (weights held constant);
  the weights receive only the gradient of ``sum_t |G_t - target_t|``; they
  are renormalised to sum to the number of tasks before each use.

Only the tasks present in a batch contribute to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FixedWeighting(nn.Module):
    def __init__(self, names: Sequence[str], weights: Sequence[float]):
        super().__init__()
        self.names = list(names)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]))

    def forward(self, losses: dict[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> torch.Tensor:
        return sum(self.weights[self.names.index(n)] * loss for n, loss in losses.items())

    def current(self) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.weights)}


class UncertaintyWeighting(nn.Module):
    def __init__(self, names: Sequence[str], kinds: Sequence[str]):
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))  # s_t = log sigma_t^2, sigma starts at 1
        factors = [0.5 if kind == "regression" else 1.0 for kind in kinds]
        self.register_buffer("factors", torch.tensor(factors))

    def forward(self, losses: dict[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> torch.Tensor:
        total = 0.0
        for name, loss in losses.items():
            i = self.names.index(name)
            s = self.log_vars[i]
            total = total + self.factors[i] * torch.exp(-s) * loss + 0.5 * s
        return total

    def current(self) -> dict[str, float]:
        """The effective weight ``c_t exp(-s_t)`` of each task."""
        weights = self.factors * torch.exp(-self.log_vars.detach())
        return {n: float(w) for n, w in zip(self.names, weights)}


class GradNorm(nn.Module):
    def __init__(self, names: Sequence[str], weights: Sequence[float], alpha: float = 1.5):
        super().__init__()
        self.names = list(names)
        self.alpha = alpha
        self.weights = nn.Parameter(torch.tensor([float(w) for w in weights]))
        # L_t(0): each task's first loss, NaN until the task is first seen
        self.register_buffer("initial", torch.full((len(self.names),), float("nan")))

    @torch.no_grad()
    def _renormalise(self) -> None:
        self.weights.clamp_(min=1e-3)
        self.weights.mul_(len(self.names) / self.weights.sum())

    def forward(self, losses: dict[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> torch.Tensor:
        self._renormalise()
        idx = torch.tensor([self.names.index(n) for n in losses])
        values = torch.stack(list(losses.values()))
        with torch.no_grad():
            fresh = torch.isnan(self.initial[idx])
            self.initial[idx[fresh]] = values[fresh].detach()
        w = self.weights[idx]
        main = (w.detach() * values).sum()
        shared = [p for p in shared if p.requires_grad]
        if len(losses) < 2 or not shared or not torch.is_grad_enabled():
            return main
        norms = torch.stack([_grad_norm(loss, shared) for loss in values])
        grad = w * norms  # G_t, differentiable in w_t only
        ratio = values.detach() / self.initial[idx]
        target = grad.mean().detach() * (ratio / ratio.mean()) ** self.alpha
        return main + (grad - target).abs().sum()

    def current(self) -> dict[str, float]:
        w = self.weights.detach()
        w = w * len(self.names) / w.sum()
        return {n: float(v) for n, v in zip(self.names, w)}


def _grad_norm(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    squares = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else loss.new_zeros(())
