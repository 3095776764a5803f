"""Students: small built-in networks, or new models made from the teacher's own parts.

Every builder leaves the teacher exactly as it was and returns a new module.
A structurally pruned student is made by pruning a copy of the teacher with
``slimkit.prune.prune_``; distillation does not import pruning (techniques stay
independent), so the caller (a script, or the recipe step) combines the two.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.distill.hooks import find_layer_list
from slimkit.errors import ConfigError


class MLP(nn.Module):
    """A plain ReLU MLP (Flatten first): Hinton's 784-1200-1200-10 teacher or 784-800-800-10 student."""

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        hidden: Sequence[int] = (800, 800),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def student_models() -> dict[str, type[nn.Module]]:
    """Architectures a student may name: the built-in models plus :class:`MLP`."""
    from slimkit.models.builtin import BUILTIN_MODELS

    return {**BUILTIN_MODELS, "mlp": MLP}


def builtin_student(name: str, **kwargs: Any) -> nn.Module:
    models = student_models()
    if name not in models:
        raise ConfigError("student.builtin", f"must be one of {', '.join(models)}; got {name!r}")
    return models[name](**kwargs)


def kept_layer_indices(n_layers: int, every: int, start: int = 0) -> list[int]:
    """Indices ``start, start + every, ...`` below ``n_layers`` (DistilBERT: every=2)."""
    if not isinstance(every, int) or every < 1:
        raise ConfigError("layers_every", f"must be a positive integer, got {every!r}")
    if not isinstance(start, int) or not 0 <= start < n_layers:
        raise ConfigError(
            "layers_start", f"must be in [0, {n_layers - 1}] for {n_layers} layers, got {start!r}"
        )
    return list(range(start, n_layers, every))


def layer_dropped_student(
    teacher: nn.Module, every: int = 2, start: int = 0, keep: Sequence[int] | None = None
) -> nn.Module:
    """A copy of ``teacher`` keeping only some of its repeated blocks (and everything else: embeddings,
    pooler, heads) with their exact weights.

    The block stack is found generically (:func:`find_layer_list`); ``keep`` lists
    block indices explicitly, otherwise every ``every``-th block from ``start``.
    Any ``config.num_hidden_layers`` (Hugging Face) inside the copy is updated.
    """
    _, layers = find_layer_list(teacher)
    n = len(layers)
    if keep is None:
        indices = kept_layer_indices(n, every, start)
    else:
        indices = list(keep)
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
        if bad or not indices or len(set(indices)) != len(indices):
            raise ConfigError("keep", f"must be distinct block indices in [0, {n - 1}], got {list(keep)}")
    student = copy.deepcopy(teacher)
    _, student_layers = find_layer_list(student)
    kept = [student_layers[i] for i in indices]
    # Slicing in place keeps the ModuleList object (and so every reference to it) valid.
    for i in range(len(student_layers) - 1, -1, -1):
        del student_layers[i]
    student_layers.extend(kept)
    _renumber(kept)
    _set_layer_count(student, indices)
    return student


def _renumber(blocks: list[nn.Module]) -> None:
    """Blocks that know their own index (for key/value caches) get their new one."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def _set_layer_count(model: nn.Module, indices: list[int]) -> None:
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "num_hidden_layers"):
            seen.add(id(config))
            layer_types = getattr(config, "layer_types", None)
            if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
                config.layer_types = [layer_types[i] for i in indices]
            config.num_hidden_layers = len(indices)
