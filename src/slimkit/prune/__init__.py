"""Pruning: unstructured magnitude masks with sparse files, and structured removal of channels and heads.

Unstructured (weights set to zero, file shrinks)::

    masks = prune_(model, MagnitudeConfig(sparsity=0.9, scope="global"))
    Trainer(model, cfg, callbacks=[MaskCallback(masks)]).fit(train)   # zeros stay zero
    finalize_(model, masks)
    save_sparse(model, "model.safetensors")                          # bitmask + values
    load_sparse(fresh_model, "model.safetensors")                    # bit-exact

Gradual (Zhu & Gupta): ``GradualPruningCallback(model, GradualConfig(final_sparsity=0.9, end_step=...))``
among the Trainer callbacks. Iterative: ``prune_iteratively_(model, config, cycles, retrain)``.

Structured (the model gets smaller and faster)::

    summary = prune_(model, StructuredConfig(ratio=0.5, importance="output"), calibration=batches)
    print(summary.table())
    save_pruned(model, "pruned.safetensors"); load_pruned(fresh_model, "pruned.safetensors")

``analyze(model, example)`` lists every channel/head group and why a group is not prunable.
"""

from slimkit.graph.groups import Group, build_groups
from slimkit.prune.api import prune_
from slimkit.prune.config import GradualConfig, MagnitudeConfig, StructuredConfig
from slimkit.prune.importance import (
    ActivationImportance,
    APoZImportance,
    Importance,
    L1Importance,
    L2Importance,
    OutputImportance,
    RandomImportance,
    TaylorImportance,
    make_importance,
)
from slimkit.prune.sparse_io import load_pruned, load_sparse, load_sparse_file, save_pruned, save_sparse
from slimkit.prune.structured import PruneSummary, analyze, prune_structured_
from slimkit.prune.unstructured import (
    GradualPruningCallback,
    MaskCallback,
    Masks,
    finalize_,
    iterative_sparsities,
    magnitude_masks,
    masks_from_zeros,
    prune_iteratively_,
    prune_magnitude_,
)

__all__ = [
    "APoZImportance",
    "ActivationImportance",
    "GradualConfig",
    "GradualPruningCallback",
    "Group",
    "Importance",
    "L1Importance",
    "L2Importance",
    "MagnitudeConfig",
    "MaskCallback",
    "Masks",
    "OutputImportance",
    "PruneSummary",
    "RandomImportance",
    "StructuredConfig",
    "TaylorImportance",
    "analyze",
    "build_groups",
    "finalize_",
    "iterative_sparsities",
    "load_pruned",
    "load_sparse",
    "load_sparse_file",
    "magnitude_masks",
    "make_importance",
    "masks_from_zeros",
    "prune_",
    "prune_iteratively_",
    "prune_magnitude_",
    "prune_structured_",
    "save_pruned",
    "save_sparse",
]
