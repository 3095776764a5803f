"""SmoothQuant: move activation outliers into the weights before int8 quantization.

Xiao et al., "SmoothQuant" (2023). For input channel ``j`` of a Linear,
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``; then ``X' = X / s`` and
``W' = W * s`` give the same product, with activations that quantize with
less error (a few large channels no longer set the step for all others). The
division is kept as a per-channel input scale in the quantized layer (one
cheap elementwise op), which works for any model without graph surgery.
"""

from __future__ import annotations

import torch


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` per input channel (1 where a channel never fired or has no weight)."""
    w_max = weight.detach().float().abs().amax(dim=0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    s = torch.where((act_absmax > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-4, max=1e4)


def chosen_alphas(model: torch.nn.Module) -> dict[str, float | None]:
    """Each int8 Linear's SmoothQuant ``alpha`` (None: not smoothed), e.g. to show what ``auto`` chose."""
    return {
        name: module.smoothquant_alpha
        for name, module in model.named_modules()
        if hasattr(module, "smoothquant_alpha")
    }
