"""Pruning: unstructured magnitude masks with sparse files, and structured removal of channels and heads."""

from slimkit.prune.api import prune_
from slimkit.prune.config import GradualConfig, MagnitudeConfig, StructuredConfig
from slimkit.prune.graph import Group, build_groups
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
