"""A model's stack of repeated blocks, found by type (shared by distillation and quantization)."""

from __future__ import annotations

from torch import nn

from slimkit.errors import ModelError


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the longest ModuleList of one block type.

    Ties go to the list met first (the outermost, in registration order).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ModelError(f"{type(model).__name__}: no nn.ModuleList of repeated blocks found")
    return best
