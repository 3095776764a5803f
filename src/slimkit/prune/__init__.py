"""Pruning: unstructured magnitude masks with sparse files, and structured removal of channels and heads.

One verb, ``prune_(model, config) -> PruneSummary``, for every method.

Unstructured (weights set to zero, file shrinks)::

    summary = prune_(model, MagnitudeConfig(sparsity=0.9, scope="global"))
    Trainer(model, cfg, callbacks=[summary.callback]).fit(train)    # zeros stay zero
    finalize_(model, summary.masks)
    save_sparse(model, "model.safetensors")                          # bitmask + values
    load_sparse(fresh_model, "model.safetensors")                    # bit-exact

Calibrated (Wanda: ``|W| x ||X||`` per output row; SparseGPT: Hessian-based, weights updated), at a
sparsity or N:M, block by block for causal LMs::

    summary = prune_(llm, SparseGPTConfig(n_m="2:4"), calibration_data=windows)

Gradual (Zhu & Gupta): ``prune_(model, GradualConfig(final_sparsity=0.9, end_step=...)).callback``
among the Trainer callbacks. Iterative: ``prune_iteratively_(model, config, cycles, retrain)``.

Structured (the model gets smaller and faster)::

    summary = prune_(model, StructuredConfig(ratio=0.5, importance="output"), calibration=batches)
    print(summary.table())
    save_pruned(model, "pruned.safetensors"); load_pruned(fresh_model, "pruned.safetensors")

Decoder LLMs: ``StructuredConfig(gqa="groups")`` (or ``"heads"``) also prunes grouped-query
attention; ``prune_(model, DepthConfig(blocks=8, importance="angular"), calibration=batches)`` drops
whole blocks.

``analyze(model, example)`` lists every channel/head group and why a group is not prunable.
A custom importance criterion is an :class:`Importance` subclass decorated with
``@register_importance("name")``; new layer types go in :mod:`slimkit.prune.slicers`.
"""

from slimkit.prune.api import prune_
from slimkit.prune.config import (
    DepthConfig,
    GradualConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    StructuredConfig,
    WandaConfig,
)
from slimkit.prune.importance import Importance, register_importance
from slimkit.prune.masks import MaskCallback, Masks
from slimkit.prune.sparse_io import load_pruned, load_sparse, load_sparse_file, save_pruned, save_sparse
from slimkit.prune.structured import analyze
from slimkit.prune.summary import PruneSummary
from slimkit.prune.unstructured import GradualPruningCallback, finalize_, prune_iteratively_

__all__ = [
    "DepthConfig",
    "GradualConfig",
    "GradualPruningCallback",
    "Importance",
    "MagnitudeConfig",
    "MaskCallback",
    "Masks",
    "PruneSummary",
    "SparseGPTConfig",
    "StructuredConfig",
    "WandaConfig",
    "analyze",
    "finalize_",
    "load_pruned",
    "load_sparse",
    "load_sparse_file",
    "prune_",
    "prune_iteratively_",
    "register_importance",
    "save_pruned",
    "save_sparse",
]
