"""Wanda and SparseGPT through ``prune_``: calibration statistics per Linear, then a pruned copy of it.

``prune_(model, WandaConfig(sparsity=0.5), calibration_data=batches, forward=...)``:

1. the layers are chosen and checked before anything runs (patterns that match nothing, N:M
   whose M does not divide a layer's input width: a :class:`ConfigError` naming the field and
   the layer); a Linear whose weight is tied to another module's (an ``lm_head`` sharing the
   embedding table) is skipped, since pruning it would prune the embeddings too;
2. each layer's inputs are summarised by a collector from :mod:`slimkit.calibration.collectors`
   (Wanda: :class:`InputNorm`; SparseGPT: :class:`HessianAccumulator`), merged across processes
   under torchrun;
3. each layer is replaced by a pruned copy (:mod:`slimkit.prune.sparsegpt`), so an error at
   any point puts the original layers back and the model is left as it was.

Causal LMs (``sequential: null``) are calibrated block by block by the shared driver
(:func:`slimkit.calibration.blocks.calibrate_by_block_`): each block's statistics come from
the outputs of the blocks already pruned, as in both papers' reference code, with one block's
inputs held at a time. Other models are calibrated in one pass over the unpruned model.

The summary's ``masks`` (True = kept) are what the sparse format stores and what
:class:`MaskCallback` keeps at zero during recovery training.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from slimkit.batch import Forward
from slimkit.calibration.blocks import by_block_when, calibrate_at_once_, calibrate_by_block_
from slimkit.calibration.collectors import HessianAccumulator, InputNorm
from slimkit.errors import ConfigError, DataError
from slimkit.prune.config import CalibratedSparsityConfig, SparseGPTConfig, WandaConfig
from slimkit.prune.masks import MaskCallback, Masks
from slimkit.prune.methods import register_method
from slimkit.prune.select import select_modules
from slimkit.prune.sparsegpt import sparsegpt_prune, wanda_mask
from slimkit.prune.summary import PruneSummary, count_parameters
from slimkit.train.distributed import DistEnv, current, gather_objects


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, count in seen.items() if count > 1}


def calibrated_layers(model: nn.Module, config: CalibratedSparsityConfig) -> tuple[list[str], list[dict]]:
    """``(layers to prune, skipped)``: the selected Linear layers, checked against the config."""
    chosen = select_modules(model, config.include, config.exclude, ["Linear"])
    tied = _tied(model)
    layers, skipped = [], []
    for name, module in chosen.items():
        if id(module.weight) in tied:
            skipped.append({"name": name, "reason": "weight tied to another module (e.g. the embeddings)"})
            continue
        if config.pattern is not None and module.in_features % config.pattern[1]:
            raise ConfigError(
                "n_m",
                f"{config.n_m} needs every layer's input width to be a multiple of M={config.pattern[1]}; "
                f"{name} has {module.in_features} inputs (exclude it)",
            )
        layers.append(name)
    if not layers:
        raise ConfigError("include", "every selected Linear layer has a tied weight: nothing to prune")
    return layers, skipped


def _collectors(config: CalibratedSparsityConfig):
    def make(name: str, module: nn.Module) -> dict[str, Any]:
        if isinstance(config, SparseGPTConfig):
            return {"hessian": HessianAccumulator(module.in_features)}
        return {"norm": InputNorm(module.in_features)}

    return make


def pruned_weight(
    weight: torch.Tensor, config: CalibratedSparsityConfig, collectors: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new weight, mask)`` of one Linear weight from its calibration collectors."""
    if isinstance(config, SparseGPTConfig):
        return sparsegpt_prune(
            weight,
            collectors["hessian"].hessian(),
            config.sparsity,
            config.pattern,
            config.block_size,
            config.damp,
        )
    mask = wanda_mask(weight, collectors["norm"].norm(), config.sparsity, config.pattern)
    return weight.detach().masked_fill(~mask, 0.0), mask


def _builder(config: CalibratedSparsityConfig, masks: Masks):
    def build(name: str, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        weight, mask = pruned_weight(module.weight, config, collectors)
        new = copy.deepcopy(module)  # a copy: the original goes back into the model on any error
        with torch.no_grad():
            new.weight.copy_(weight)
        masks[f"{name}.weight"] = mask
        return new

    return build


def _require_batches(count: int, env: DistEnv | None) -> None:
    """Every process needs batches; all raise together (none waits at a merge for one that stopped)."""
    counts = gather_objects(count, env) if env is not None else [count]
    empty = [rank for rank, n in enumerate(counts) if n == 0]
    if empty:
        where = f" to process {empty[0]} under torchrun ({len(counts)} processes)" if env is not None else ""
        raise DataError(f"calibration: no batches were given{where}")


def prune_calibrated_(
    model: nn.Module,
    config: CalibratedSparsityConfig,
    calibration_data: Iterable[Any] | None = None,
    forward: Forward | None = None,
    max_batches: int | None = None,
) -> PruneSummary:
    """Prune ``model``'s Linear layers in place with Wanda or SparseGPT (see the module's docstring)."""
    layers, skipped = calibrated_layers(model, config)  # validates before any pass
    if calibration_data is None:
        raise DataError(f"{config.method} pruning needs calibration_data (batches of the model's inputs)")
    batches = list(islice(calibration_data, max_batches) if max_batches is not None else calibration_data)
    env = current()
    _require_batches(len(batches), env)
    masks = Masks()
    params = count_parameters(model)
    kwargs = dict(layers=layers, collectors=_collectors(config), build=_builder(config, masks), env=env)
    if by_block_when(model, config.sequential):
        calibrate_by_block_(
            model, batches, forward, micro_batch=config.micro_batch, hold=config.hold_inputs, **kwargs
        )
    else:
        calibrate_at_once_(model, batches, forward, **kwargs)
    return PruneSummary(
        method=config.method,
        params_before=params,
        params_after=params,
        skipped=skipped,
        masks=masks,
        callback=MaskCallback(masks),
        sparsity=masks.sparsity(),
    )


register_method(WandaConfig)(prune_calibrated_)
register_method(SparseGPTConfig)(prune_calibrated_)
