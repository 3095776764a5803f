"""Fine-tuning strategies: what trains, and how fast, layer by layer.

The encoder's layers are found, not named: its *blocks* are the longest
``nn.ModuleList`` inside it (``encoder.layer`` in BERT, ``transformer.layer``
in DistilBERT, ``h`` in GPT-2), or the list a ``layers`` pattern names.
Parameters before the blocks (embeddings) form the bottom group; those after
them (a pooler, a final norm) join the top block. The head is everything
outside the encoder.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

from torch import nn

from slimkit.errors import ConfigError
from slimkit.train.callbacks import Callback
from slimkit.transfer.heads import backbone_of, head_parameters


def find_blocks(backbone: nn.Module, pattern: str | None = None, field: str = "layers") -> str:
    """Qualified name of the ModuleList of repeated blocks (the longest one, or the one ``pattern`` names)."""
    lists = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if pattern is not None:
        lists = [(n, m) for n, m in lists if fnmatch.fnmatchcase(n, pattern)]
        if not lists:
            raise ConfigError(field, f"pattern {pattern!r} matches no list of layers in the encoder")
    if not lists:
        raise ConfigError(field, f"{type(backbone).__name__} has no list of layers (nn.ModuleList)")
    return max(lists, key=lambda item: len(item[1]))[0]


def layer_groups(backbone: nn.Module, pattern: str | None = None) -> list[list[nn.Parameter]]:
    """The encoder's parameters in groups from the bottom (embeddings) to the top block."""
    blocks = find_blocks(backbone, pattern)
    prefix = f"{blocks}."
    count = len(backbone.get_submodule(blocks))
    groups: list[list[nn.Parameter]] = [[] for _ in range(count + 1)]
    seen_block = False
    for name, param in backbone.named_parameters():
        if name.startswith(prefix):
            seen_block = True
            groups[int(name[len(prefix) :].split(".", 1)[0]) + 1].append(param)
        else:
            groups[-1 if seen_block else 0].append(param)
    return [g for g in groups if g]


def set_trainable_(params: Sequence[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


def freeze_backbone_(model: nn.Module) -> None:
    """Linear probe: only the parameters outside the encoder train."""
    set_trainable_(list(backbone_of(model).parameters()), False)
    set_trainable_(head_parameters(model), True)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def discriminative_groups(
    model: nn.Module, decay: float = 1.0, head_scale: float = 1.0, pattern: str | None = None
) -> list[dict]:
    """Optimizer param groups: the head at ``lr * head_scale``, encoder group ``k`` below the top at
    ``lr * decay**k`` (the top block at ``lr``). The head's group is marked ``role: head``: the
    trainer logs the base ``lr`` and, when scaled, the head's rate apart as ``head_lr``.

    Frozen parameters are included: gradual unfreezing turns them on later.
    """
    groups = [{"params": head_parameters(model), "lr_scale": head_scale, "role": "head"}]
    layers = layer_groups(backbone_of(model), pattern)
    for depth, params in enumerate(reversed(layers)):
        groups.append({"params": params, "lr_scale": decay**depth})
    return groups


class GradualUnfreezing(Callback):
    """Start with the head alone; unfreeze one encoder group from the top every ``every`` epochs or steps.

    The stage is a function of the epoch/step counter, so a resumed run is at the same stage.
    """

    def __init__(self, groups: list[list[nn.Parameter]], every: int = 1, unit: str = "epoch"):
        self.groups = groups  # bottom -> top
        self.every = every
        self.unit = unit
        self.unfrozen = 0

    def schedule_length(self, steps_per_epoch: int) -> int:
        """Steps until the last group is unfrozen."""
        per_stage = self.every * (steps_per_epoch if self.unit == "epoch" else 1)
        return len(self.groups) * per_stage

    def _apply(self, counter: int) -> None:
        stage = min(counter // self.every, len(self.groups))
        self.unfrozen = stage
        for i, params in enumerate(reversed(self.groups)):
            set_trainable_(params, i < stage)

    def on_train_begin(self, trainer) -> None:
        self._apply(trainer.state["epoch"] if self.unit == "epoch" else trainer.global_step)

    def on_epoch_begin(self, trainer) -> None:
        if self.unit == "epoch":
            self._apply(trainer.state["epoch"])

    def on_step_end(self, trainer) -> None:
        if self.unit == "step":
            self._apply(trainer.global_step)


def check_schedule(
    callback: GradualUnfreezing, n_train: int, batch_size: int, epochs: int, max_steps
) -> None:
    """An unfreezing schedule must end before training does, with steps left to train the whole model."""
    steps_per_epoch = math.ceil(n_train / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    needed = callback.schedule_length(steps_per_epoch)
    if needed >= total:
        unit = f"{callback.unit}s"
        raise ConfigError(
            "unfreeze_every",
            f"unfreezing {len(callback.groups)} layer groups every {callback.every} {unit} takes "
            f"{needed} steps but training has {total} ({epochs} epochs of {steps_per_epoch} steps): "
            "lower unfreeze_every or train longer",
        )
