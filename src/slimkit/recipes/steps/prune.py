"""The ``prune`` step: one pruning method, with optional recovery training.

YAML (exactly one of ``magnitude``, ``gradual``, ``wanda``, ``sparsegpt``, ``structured``, ``depth``)::

    - type: prune
      structured: {ratio: 0.5, importance: taylor}
      calibration_samples: 256      # structured: train samples for data-driven importance
      train: {epochs: 6, lr: 0.002}  # recovery training after pruning

    - type: prune
      gradual: {final_sparsity: 0.7, end_step: 80, frequency: 10}
      train: {epochs: 8, lr: 0.001}  # gradual pruning happens during this training

    - type: prune                   # decoder LLMs: half of every block Linear, Hessian-compensated
      sparsegpt: {sparsity: 0.5}    # or n_m: "2:4"; wanda: {...} takes the same keys (no damp/block_size)
      calibration_samples: 16       # train windows; calibrated block by block for causal LMs

    - type: prune                   # decoder LLMs: FFN neurons and one KV group of three
      structured: {ratio: 0.25, head_ratio: 0.34, gqa: groups, importance: activation}
      calibration_samples: 32

    - type: prune                   # drop 8 whole decoder blocks (ShortGPT block influence)
      depth: {blocks: 8, importance: angular}
      calibration_samples: 32

Unstructured results (magnitude, gradual, wanda, sparsegpt) are finalised and stored in the
sparse format, so the report's size column is the sparse file; structured
results store their new shapes with the weights; a causal LM whose blocks all kept the same
shapes (and a depth-pruned one) is stored as a Hugging Face folder with its config updated, which
``AutoModelForCausalLM.from_pretrained`` opens; one whose blocks differ stays in slimkit's pruned
format (the step's ``saved_as`` note says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from slimkit.config import positive_int, require, to_dict
from slimkit.models.causal_lm import is_causal_lm
from slimkit.models.hf_folder import folder_form_problem, save_hf_folder
from slimkit.prune import (
    DepthConfig,
    GradualConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    StructuredConfig,
    WandaConfig,
    finalize_,
    load_pruned,
    load_sparse,
    prune_,
    save_pruned,
    save_sparse,
)
from slimkit.recipes.steps.base import TRAIN_MOVED, RunContext, StepResult, register_step, under
from slimkit.recipes.steps.saving import register_format
from slimkit.train import TrainConfig

METHODS = ("magnitude", "gradual", "wanda", "sparsegpt", "structured", "depth")
CALIBRATED = ("wanda", "sparsegpt")  # unstructured, from calibration statistics

# How the run keeps a pruned model for --resume: load_pruned shrinks the model before the step first.
register_format("sparse", save_sparse, load_sparse)
register_format("pruned", save_pruned, load_pruned)


@dataclass(frozen=True)
class PruneStep:
    magnitude: MagnitudeConfig | None = None
    gradual: GradualConfig | None = None
    wanda: WandaConfig | None = None
    sparsegpt: SparseGPTConfig | None = None
    structured: StructuredConfig | None = None
    depth: DepthConfig | None = None
    train: TrainConfig | None = None  # recovery training after (gradual: during) pruning
    calibration_samples: int = (
        256  # structured, depth, wanda, sparsegpt: samples from the train split for the statistics
    )

    MOVED: ClassVar[dict[str, str]] = {"finetune": TRAIN_MOVED}

    def __post_init__(self):
        given = [k for k in METHODS if getattr(self, k) is not None]
        require(
            len(given) == 1,
            given[-1] if given else "magnitude",
            "give exactly one of magnitude, gradual, wanda, sparsegpt, structured or depth",
        )
        require(
            self.gradual is None or self.train is not None,
            "train",
            "gradual pruning happens while training: give train settings",
        )
        positive_int(self.calibration_samples, "calibration_samples")

    def to_yaml(self) -> dict[str, Any]:
        """The method given, under its key (the ones left out are not written as nulls)."""
        return {k: v for k, v in to_dict(self).items() if k not in METHODS or v is not None}

    @property
    def method(self) -> str:
        return next(k for k in METHODS if getattr(self, k) is not None)


@register_step(
    "prune",
    config=PruneStep,
    doc="magnitude, gradual, wanda, sparsegpt, structured or depth pruning, with optional recovery training",
)
def run_prune(ctx: RunContext, cfg: PruneStep) -> StepResult:
    shaped = cfg.structured is not None or cfg.depth is not None
    return _structured(ctx, cfg) if shaped else _unstructured(ctx, cfg)


def _unstructured(ctx: RunContext, cfg: PruneStep) -> StepResult:
    model = ctx.model
    with under(cfg.method):
        if cfg.method in CALIBRATED:
            # Under torchrun each process takes its share; the statistics are summed across them.
            batches = ctx.calibration_batches(cfg.calibration_samples, shard=True)
            summary = prune_(
                model, getattr(cfg, cfg.method), calibration_data=batches, forward=ctx.task.forward
            )
        else:
            summary = prune_(model, cfg.gradual or cfg.magnitude)
    if cfg.train is not None:
        ctx.train(model, cfg.train, callbacks=[summary.callback])
    else:
        summary.masks.apply_(model)
    masks = summary.callback.masks  # gradual: the masks as the schedule left them
    notes = {
        "sparsity": round(masks.sparsity(), 4),
        "layer_sparsity": {k: round(v, 4) for k, v in masks.layer_sparsity().items()},
    }
    if summary.skipped:  # wanda, sparsegpt: a tied lm_head is left dense
        notes["skipped"] = {s["name"]: s["reason"] for s in summary.skipped}
    ctx.log.info("prune: %.1f%% of the selected weights are zero", 100 * masks.sparsity())
    finalize_(model, masks)  # the masks are folded in (and cleared): the zeros are now the weights
    return StepResult(model, saver=save_sparse, notes=notes)


def _structured(ctx: RunContext, cfg: PruneStep) -> StepResult:
    model, task = ctx.model, ctx.task
    # a causal LM's batch makes batch x seq_len x vocab logits: one window per batch bounds them
    calibration = ctx.calibration_batches(
        cfg.calibration_samples, batch_size=1 if is_causal_lm(model) else 32
    )
    with under(cfg.method):
        summary = prune_(
            model,
            cfg.structured or cfg.depth,
            calibration=calibration,
            forward=task.one_call,  # the graph trace needs one model call per batch
            loss_fn=lambda m, b: task.loss_fn(task.forward(m, b), b),
        )
    if cfg.train is not None:
        ctx.train(model, cfg.train)
    notes: dict[str, Any] = {
        "params_before": summary.params_before,
        "params_after": summary.params_after,
        "groups_pruned": len(summary.groups),
        "groups_skipped": len(summary.skipped),
    }
    if summary.details:
        notes["depth"] = summary.details
    if summary.non_uniform:
        notes["non_uniform"] = summary.non_uniform
    ctx.log.info("prune (%s):\n%s", cfg.method, summary.table())
    saver, notes["saved_as"] = _shaped_saver(model)
    return StepResult(model, saver=saver, notes=notes)


def _shaped_saver(model) -> tuple:
    """A Hugging Face folder for a causal LM that still has one (uniform blocks), else the pruned format."""
    if not is_causal_lm(model):
        return save_pruned, "pruned"
    problem = folder_form_problem(model)
    if problem is None:
        return save_hf_folder, "hf_folder"
    return save_pruned, f"pruned (no Hugging Face form: {problem})"
