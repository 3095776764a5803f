"""The ``prune`` recipe step: one pruning method, then optional fine-tuning.

Exactly one of ``magnitude`` (one-shot masks), ``gradual`` (Zhu & Gupta
schedule while fine-tuning) or ``structured`` (physically removes units) is
given. Unstructured results are finalised and stored in the sparse format, so
the report's size column is the sparse file; structured results store their
new shapes with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.config import positive_int, require
from slimkit.prune.api import prune_
from slimkit.prune.config import GradualConfig, MagnitudeConfig, StructuredConfig
from slimkit.prune.sparse_io import save_pruned, save_sparse
from slimkit.prune.unstructured import GradualPruningCallback, MaskCallback, finalize_
from slimkit.recipes.registry import StepType
from slimkit.train import TrainConfig


@dataclass
class PruneStepConfig:
    magnitude: MagnitudeConfig | None = None
    gradual: GradualConfig | None = None
    structured: StructuredConfig | None = None
    finetune: TrainConfig | None = None  # recovery training after (or, for gradual, during) pruning
    calibration_samples: int = 256  # structured: samples from the train split for data-driven importance

    def __post_init__(self):
        given = [k for k in ("magnitude", "gradual", "structured") if getattr(self, k) is not None]
        require(
            len(given) == 1,
            "magnitude" if not given else given[-1],
            "give exactly one of magnitude, gradual or structured",
        )
        require(
            self.gradual is None or self.finetune is not None,
            "finetune",
            "gradual pruning happens while training: give finetune settings",
        )
        positive_int(self.calibration_samples, "calibration_samples")


def run_prune(ctx, config: PruneStepConfig) -> None:
    if config.structured is not None:
        _structured(ctx, config)
    else:
        _unstructured(ctx, config)


def _unstructured(ctx, config: PruneStepConfig) -> None:
    if config.gradual is not None:
        callback = GradualPruningCallback(ctx.model, config.gradual)
    else:
        callback = MaskCallback(prune_(ctx.model, config.magnitude))
    if config.finetune is not None:
        ctx.train(config.finetune, callbacks=[callback])
    else:
        callback.masks.apply_(ctx.model)
    masks = callback.masks
    ctx.notes.update(
        sparsity=round(masks.sparsity(), 4),
        layer_sparsity={k: round(v, 4) for k, v in masks.layer_sparsity().items()},
    )
    ctx.log.info("prune: %.1f%% of the selected weights are zero", 100 * masks.sparsity())
    finalize_(ctx.model, masks)  # masks are folded in (and cleared): the zeros are now the weights
    ctx.saver = save_sparse


def _structured(ctx, config: PruneStepConfig) -> None:
    task = ctx.task
    calibration = ctx.calibration_batches(config.calibration_samples)
    summary = prune_(
        ctx.model,
        config.structured,
        calibration=calibration,
        forward=task.forward,
        loss_fn=lambda m, b: task.loss_fn(task.forward(m, b), b),
    )
    if config.finetune is not None:
        ctx.train(config.finetune)
    ctx.saver = save_pruned
    ctx.notes.update(
        params_before=summary.params_before,
        params_after=summary.params_after,
        groups_pruned=len(summary.groups),
        groups_skipped=len(summary.skipped),
    )
    ctx.log.info("prune (structured):\n%s", summary.table())


STEPS = {
    "prune": StepType(
        PruneStepConfig,
        run_prune,
        changes_model=True,
        doc="magnitude, gradual or structured pruning, with optional fine-tuning",
    ),
}
