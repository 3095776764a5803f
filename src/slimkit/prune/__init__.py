"""Pruning: unstructured magnitude masks with sparse files, and structured removal of channels and heads."""

from slimkit.prune.api import prune_
from slimkit.prune.config import GradualConfig, MagnitudeConfig, StructuredConfig
from slimkit.prune.sparse_io import load_sparse, load_sparse_file, save_sparse
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
    "GradualConfig",
    "GradualPruningCallback",
    "MagnitudeConfig",
    "MaskCallback",
    "Masks",
    "StructuredConfig",
    "finalize_",
    "iterative_sparsities",
    "load_sparse",
    "load_sparse_file",
    "magnitude_masks",
    "masks_from_zeros",
    "prune_",
    "prune_iteratively_",
    "prune_magnitude_",
    "save_sparse",
]
