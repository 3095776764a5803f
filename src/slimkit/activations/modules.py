"""The cheaper activation modules that replacements put in a model.

``nn.ReLU``, ``nn.Hardswish``, ``nn.Hardsigmoid`` and ``nn.Hardtanh`` come from PyTorch; two are
slimkit's:

- :class:`HardGELU`: ``x * hardsigmoid(1.702 x)``, the hard version of GELU's sigmoid form
  ``x * sigmoid(1.702 x)``, as hard-swish is of SiLU's ``x * sigmoid(x)``;
- :class:`PiecewiseLinear`: ``k`` linear segments interpolating the replaced function at ``k + 1``
  evenly spaced points of ``[-r, r]``, continued outside by the function's asymptotes (0 and x for
  GELU/SiLU, the constants for tanh/sigmoid). Built from the replaced module itself, so every GELU
  flavour (erf, tanh, quick) gets its own table. The interpolation error inside the range is at
  most ``h^2 / 8 * max|f''|`` (``h = 2r / k``).

Both hold no parameters and no persistent buffers: a replaced model's weights file has the same
tensors as the original one, and loading it means re-applying the replacement first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GELU_SIGMOID_SCALE = 1.702  # GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks & Gimpel)

#: Per kind: the largest range ``r`` worth interpolating (where the function meets its asymptote
#: within about 1e-3) and the asymptotes as (slope, intercept) left of ``-r`` and right of ``r``.
PWL_SHAPES: dict[str, tuple[float, tuple[float, float], tuple[float, float]]] = {
    "gelu": (4.0, (0.0, 0.0), (1.0, 0.0)),
    "silu": (8.0, (0.0, 0.0), (1.0, 0.0)),
    "tanh": (4.0, (0.0, -1.0), (0.0, 1.0)),
    "sigmoid": (8.0, (0.0, 0.0), (0.0, 1.0)),
}
RANGE_CANDIDATES = 32  # ranges tried between r/4 and r: few segments fit best over a shorter range


class HardGELU(nn.Module):
    """``x * hardsigmoid(1.702 x)``: GELU with its sigmoid made piecewise linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(x * GELU_SIGMOID_SCALE)


class PiecewiseLinear(nn.Module):
    """``slope[i] * x + intercept[i]`` on the segment ``i`` that holds ``x`` (found by bucketize)."""

    def __init__(self, breaks: torch.Tensor, slopes: torch.Tensor, intercepts: torch.Tensor, kind: str = ""):
        super().__init__()
        if not (len(slopes) == len(intercepts) == len(breaks) + 1):
            raise ValueError("a piecewise-linear function needs one more segment than breakpoints")
        self.kind = kind
        # Not persistent: rebuilt from the replaced function, so the state dict stays the model's own.
        self.register_buffer("breaks", breaks.float().contiguous(), persistent=False)
        self.register_buffer("slopes", slopes.float(), persistent=False)
        self.register_buffer("intercepts", intercepts.float(), persistent=False)

    @classmethod
    def fit(cls, function: nn.Module, kind: str, segments: int) -> PiecewiseLinear:
        """Interpolate ``function`` (an activation module of ``kind``) with ``segments`` segments over
        the range whose largest error is smallest: a wider range shrinks the tails' error and
        widens the segments (the interpolation error grows with their width squared)."""
        r_max = PWL_SHAPES[kind][0]
        grid = torch.linspace(-2 * r_max, 2 * r_max, 4001)
        with torch.no_grad():
            exact = function(grid).float()
            fits = [
                cls.over(function, kind, segments, float(r))
                for r in torch.linspace(r_max / 4, r_max, RANGE_CANDIDATES)
            ]
            errors = [float((f(grid) - exact).abs().max()) for f in fits]
        return fits[errors.index(min(errors))]

    @classmethod
    def over(cls, function: nn.Module, kind: str, segments: int, r: float) -> PiecewiseLinear:
        """Interpolate ``function`` at ``segments + 1`` evenly spaced points of ``[-r, r]``."""
        _, left, right = PWL_SHAPES[kind]
        knots = torch.linspace(-r, r, segments + 1, dtype=torch.float64)
        with torch.no_grad():
            values = function(knots.float()).double()
        # The ends sit on the asymptotes so that the function is continuous where the tails begin.
        values[0] = left[0] * knots[0] + left[1]
        values[-1] = right[0] * knots[-1] + right[1]
        inner = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
        slopes = torch.cat([torch.tensor([left[0]]), inner, torch.tensor([right[0]])])
        intercepts = torch.cat(
            [torch.tensor([left[1]]), values[:-1] - inner * knots[:-1], torch.tensor([right[1]])]
        )
        return cls(knots, slopes, intercepts, kind)

    @property
    def segments(self) -> int:
        return len(self.breaks) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.bucketize(x.detach(), self.breaks.to(x.dtype))
        slopes, intercepts = self.slopes.to(x.dtype), self.intercepts.to(x.dtype)
        return torch.addcmul(intercepts[index], slopes[index], x)

    def extra_repr(self) -> str:
        lo, hi = float(self.breaks[0]), float(self.breaks[-1])
        return f"kind={self.kind!r}, segments={self.segments}, range=[{lo:g}, {hi:g}]"
