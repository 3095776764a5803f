"""One entry point: ``prune_(model, config)`` dispatching on the config type."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.prune.config import MagnitudeConfig, StructuredConfig
from slimkit.prune.unstructured import Masks, prune_magnitude_


def prune_(model: nn.Module, config: MagnitudeConfig | StructuredConfig, **kwargs: Any) -> Any:
    """Prune ``model`` in place.

    * :class:`MagnitudeConfig` -> zeroes weights, returns :class:`Masks` (hand them to
      :class:`MaskCallback` while fine-tuning, then :func:`finalize_`).
    * :class:`StructuredConfig` -> removes neurons/channels/heads, returns a
      :class:`PruneSummary`; keyword arguments go to :func:`prune_structured_`
      (``calibration``, ``example_inputs``, ``forward``, ``loss_fn``).
    """
    if isinstance(config, MagnitudeConfig):
        if kwargs:
            raise TypeError(f"magnitude pruning takes no extra arguments, got {sorted(kwargs)}")
        return prune_magnitude_(model, config)
    if isinstance(config, StructuredConfig):
        from slimkit.prune.structured import prune_structured_

        return prune_structured_(model, config, **kwargs)
    raise TypeError(f"prune_ needs a MagnitudeConfig or StructuredConfig, got {type(config).__name__}")


__all__ = ["Masks", "prune_"]
