"""What ``prune_`` did, whatever the method: one summary type for magnitude, gradual and structured."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimkit.prune.masks import Masks
from slimkit.train.callbacks import Callback


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class PruneSummary:
    """The result of :func:`prune_ <slimkit.prune.api.prune_>`.

    ``params_before``/``params_after`` count parameters (unstructured pruning
    zeroes weights without removing them, so they stay equal there; see
    ``sparsity``). ``groups``/``skipped`` and the MACs are filled by structured
    pruning. ``masks`` (magnitude, gradual) are the unstructured masks;
    ``callback`` goes among the Trainer callbacks while fine-tuning: a
    :class:`MaskCallback` that keeps magnitude-pruned zeros at zero, or the
    :class:`GradualPruningCallback` that does the pruning during training.
    ``sparsity`` is the fraction of the selected weights that are zero now
    (``None`` for gradual pruning, which has not pruned anything yet).
    """

    method: str
    params_before: int = 0
    params_after: int = 0
    groups: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    macs_before: int | None = None  # on the traced example batch
    macs_after: int | None = None
    masks: Masks | None = None
    callback: Callback | None = None
    sparsity: float | None = None
    # Hugging Face config fields written after structured/depth pruning, and the ones left as they
    # were because the blocks now differ (such a model is stored in slimkit's pruned format)
    config: dict[str, int] = field(default_factory=dict)
    non_uniform: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific figures (depth: block scores)

    def table(self) -> str:
        lines = [f"pruning: {self.method}"]
        if self.groups:
            lines.append(f"{'group':50s} {'kind':7s} {'before':>6s} {'after':>6s}")
            for g in self.groups:
                lines.append(f"{g['name'][:50]:50s} {g['kind']:7s} {g['before']:6d} {g['after']:6d}")
        if self.masks:
            lines.append(f"{'layer':50s} {'zeros':>7s}")
            for name, value in self.masks.layer_sparsity().items():
                lines.append(f"{name[:50]:50s} {100 * value:6.1f}%")
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,}")
        if self.config:
            lines.append("config: " + ", ".join(f"{k}={v}" for k, v in self.config.items()))
        if self.non_uniform:
            lines.append(f"differs across blocks (no Hugging Face form): {', '.join(self.non_uniform)}")
        if self.sparsity is not None:
            lines.append(f"selected weights at zero: {100 * self.sparsity:.1f}%")
        if self.macs_before is not None and self.macs_after is not None:
            lines.append(f"MACs (example batch): {self.macs_before:,} -> {self.macs_after:,}")
        return "\n".join(lines)
