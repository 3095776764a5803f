"""One entry point: ``prune_(model, config)``, dispatching on the config type through the method table."""

from __future__ import annotations

from typing import Any

from torch import nn

# Importing the handler modules registers their config types in the method table.
import slimkit.prune.calibrated  # noqa: F401
import slimkit.prune.depth  # noqa: F401
import slimkit.prune.structured  # noqa: F401
import slimkit.prune.unstructured  # noqa: F401
from slimkit.prune.config import (
    DepthConfig,
    GradualConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    StructuredConfig,
    WandaConfig,
)
from slimkit.prune.methods import handler_for
from slimkit.prune.summary import PruneSummary


def prune_(
    model: nn.Module,
    config: MagnitudeConfig | GradualConfig | StructuredConfig | DepthConfig | WandaConfig | SparseGPTConfig,
    **kwargs: Any,
) -> PruneSummary:
    """Prune ``model`` in place with the method registered for ``config``'s type.

    * :class:`MagnitudeConfig` -> zeroes weights now; ``summary.masks`` and
      ``summary.callback`` (a :class:`MaskCallback` to keep the zeros while
      fine-tuning; then :func:`finalize_`).
    * :class:`GradualConfig` -> nothing changes yet; ``summary.callback`` is the
      :class:`GradualPruningCallback` that prunes during training.
    * :class:`StructuredConfig` -> removes neurons/channels/heads; keyword
      arguments go to :func:`prune_structured_ <slimkit.prune.structured.prune_structured_>`
      (``calibration``, ``example_inputs``, ``forward``, ``loss_fn``, ``importance``).
    * :class:`DepthConfig` -> drops whole decoder blocks, ranked on ``calibration``
      (:func:`prune_depth_ <slimkit.prune.depth.prune_depth_>`: ``forward``, ``loss_fn``).
    * :class:`WandaConfig`, :class:`SparseGPTConfig` -> zeroes weights now (SparseGPT also updates the
      weights it keeps), calibrated on ``calibration_data`` (``forward``, ``max_batches``; block by
      block for causal LMs: :func:`prune_calibrated_ <slimkit.prune.calibrated.prune_calibrated_>`);
      ``summary.masks`` / ``summary.callback`` as for magnitude.
    """
    return handler_for(config)(model, config, **kwargs)


__all__ = ["PruneSummary", "prune_"]
