"""Per-layer grid search of per-input-channel scales, shared by AWQ and SmoothQuant's ``alpha: auto``.

Both methods scale a Linear's input channels by ``s`` (``y = (x / s) @ W'(s)^T``)
with ``s`` a function of one exponent ``alpha``, and pick ``alpha`` per layer by
the error of the layer's quantized output against the float one, measured on a
bounded sample of the layer's calibration input rows
(:class:`~slimkit.quant.collectors.ActivationSample`). Only how ``s`` is made
and what the quantized layer computes differ; they are the two callables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def search_scales(
    x: torch.Tensor,
    weight: torch.Tensor,
    alphas: Iterable[Any],
    scales_for: Callable[[Any], torch.Tensor | None],
    output_for: Callable[[Any], torch.Tensor],
) -> tuple[torch.Tensor | None, Any, dict[Any, float]]:
    """``(s, alpha, errors)``: the scales of the ``alpha`` whose ``output_for(s)`` is closest to ``x @ W^T``.

    ``errors`` maps each ``alpha`` tried to its mean squared output error; ties
    keep the first ``alpha`` (so list the plainest candidate first). A candidate
    may stand for "no scaling" (``scales_for`` returning None).
    """
    ref = x @ weight.t()
    best, best_alpha, errors = None, None, {}
    for alpha in alphas:
        s = scales_for(alpha)
        errors[alpha] = float((output_for(s) - ref).pow(2).mean())
        if len(errors) == 1 or errors[alpha] < errors[best_alpha]:
            best, best_alpha = s, alpha
    if not errors:
        raise ValueError("search_scales: no alpha to try")
    return best, best_alpha, errors
