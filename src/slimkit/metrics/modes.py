"""Run a model in eval mode and give it back exactly as it was.

Measuring must not change the model. ``model.train(flag)`` would flatten a
mixed state (a frozen BatchNorm kept in eval inside a training model), so
every module's own flag is recorded and restored one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore each module's train/eval flag after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
