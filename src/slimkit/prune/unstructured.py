"""Unstructured magnitude pruning: masks on |w|, one-shot, iterative or gradual (Zhu & Gupta).

The masks and the callback that holds them during fine-tuning are in
:mod:`slimkit.prune.masks`. ``prune_`` handles :class:`MagnitudeConfig`
(weights zeroed now) and :class:`GradualConfig` (a callback that prunes while
training) through the handlers registered at the end of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import ModelError
from slimkit.prune.config import GradualConfig, MagnitudeConfig, parse_n_m
from slimkit.prune.masks import MaskCallback, Masks
from slimkit.prune.methods import no_extra_arguments, register_method
from slimkit.prune.patterns import n_m_mask, smallest_mask
from slimkit.prune.select import select_modules
from slimkit.prune.summary import PruneSummary, count_parameters


def prunable_parameters(model: nn.Module, config: MagnitudeConfig) -> dict[str, torch.Tensor]:
    """``{parameter name: tensor}`` selected by the config (validates patterns and layers)."""
    modules = select_modules(model, config.include, config.exclude, config.module_types)
    params = {}
    for mod_name, module in modules.items():
        for pname in ("weight", "bias") if config.prune_bias else ("weight",):
            p = getattr(module, pname, None)
            if isinstance(p, torch.Tensor) and p.is_floating_point():
                params[f"{mod_name}.{pname}"] = p
    if not params:
        raise ModelError(f"no floating-point weights in the selected layers {sorted(modules)[:5]}")
    return params


def _n_m_mask(name: str, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each output row."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ModelError(
            f"{name}: {rows.shape[1]} inputs per output are not a multiple of M={m} for N:M pruning"
        )
    return n_m_mask(rows.abs(), n, m).reshape(weight.shape)


def magnitude_masks(model: nn.Module, config: MagnitudeConfig) -> Masks:
    """Compute masks without touching the model."""
    params = prunable_parameters(model, config)
    masks = Masks()
    if config.n_m is not None:
        n, m = parse_n_m(config.n_m)
        for name, p in params.items():
            masks[name] = _n_m_mask(name, p, n, m)
        return masks
    if config.threshold is not None:
        for name, p in params.items():
            masks[name] = p.detach().abs() > config.threshold
        return masks
    if config.scope == "layer":
        for name, p in params.items():
            masks[name] = smallest_mask(p.detach().abs(), round(config.sparsity * p.numel()))
        return masks
    flat = torch.cat([p.detach().abs().flatten().float() for p in params.values()])
    keep = smallest_mask(flat, round(config.sparsity * flat.numel()))
    offset = 0
    for name, p in params.items():
        masks[name] = keep[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return masks


def prune_magnitude_(model: nn.Module, config: MagnitudeConfig) -> Masks:
    """Zero the selected weights in place; return the masks (keep them for fine-tuning)."""
    masks = magnitude_masks(model, config)  # validates everything before the model changes
    masks.apply_(model)
    return masks


def masks_from_zeros(model: nn.Module, config: MagnitudeConfig | None = None) -> Masks:
    """Masks that keep every non-zero weight (e.g. after ``load_sparse``), to resume fine-tuning."""
    config = config or MagnitudeConfig(sparsity=0.0)
    return Masks({n: p.detach() != 0 for n, p in prunable_parameters(model, config).items()})


def finalize_(model: nn.Module, masks: Masks) -> nn.Module:
    """Fold the masks into the weights for good: the model no longer needs them."""
    masks.apply_(model)
    masks.clear()
    return model


class GradualPruningCallback(MaskCallback):
    """Zhu & Gupta's gradual magnitude pruning: sparsity follows a cubic schedule over training steps.

    Every ``frequency`` steps the masks are recomputed at the scheduled sparsity
    from the current magnitudes (pruned weights stay at zero, so they remain
    pruned); in between, the masks are held like :class:`MaskCallback`.
    """

    def __init__(self, model: nn.Module, config: GradualConfig):
        self.config = config
        self.history: list[tuple[int, float]] = []
        super().__init__(magnitude_masks(model, config.magnitude(config.initial_sparsity)))

    def on_train_begin(self, trainer) -> None:
        if self.history:  # resumed from a checkpoint: the masks came with it (load_state_dict)
            model = trainer.model
            self.masks.update({n: m.to(model.get_parameter(n).device) for n, m in self.masks.items()})
            self.masks.apply_(model)
        else:
            self._update(trainer.model, trainer.global_step)

    def on_step_end(self, trainer) -> None:
        step = trainer.global_step
        cfg = self.config
        on_schedule = cfg.start_step <= step <= cfg.end_step and (step - cfg.start_step) % cfg.frequency == 0
        # Training may stop between two updates: make sure the final sparsity is reached.
        overdue = step >= cfg.end_step and (not self.history or self.history[-1][1] < cfg.final_sparsity)
        if on_schedule or overdue:
            self._update(trainer.model, step)
        self.masks.apply_(trainer.model)

    def _update(self, model: nn.Module, step: int) -> None:
        sparsity = self.config.sparsity_at(step)
        new = magnitude_masks(model, self.config.magnitude(sparsity))
        # Never revive a weight that an earlier step pruned.
        for name, mask in new.items():
            self.masks[name] = mask & self.masks[name] if name in self.masks else mask
        self.masks.apply_(model)
        self.history.append((step, sparsity))

    def state_dict(self) -> dict:
        # The masks themselves (checkpoints keep tensors): recomputed from the magnitudes at resume,
        # they would prune at the sparsity of the resume step, not of the last scheduled update.
        return {"history": self.history, "masks": dict(self.masks)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
        if "masks" in state:
            self.masks.clear()  # in place: the PruneSummary holds this very Masks object
            self.masks.update({name: mask.bool() for name, mask in state["masks"].items()})


def iterative_sparsities(final_sparsity: float, cycles: int) -> list[float]:
    """Per-cycle targets for prune-and-retrain: the kept fraction shrinks geometrically."""
    if cycles < 1:
        raise ValueError("cycles must be >= 1")
    return [1.0 - (1.0 - final_sparsity) ** ((k + 1) / cycles) for k in range(cycles)]


def prune_iteratively_(model: nn.Module, config: MagnitudeConfig, cycles: int, retrain) -> Masks:
    """Prune to ``config.sparsity`` in ``cycles`` prune-and-retrain rounds.

    ``retrain(model, callback)`` fine-tunes the model with the given
    :class:`MaskCallback` among its Trainer callbacks.
    """
    if config.sparsity is None:
        raise ValueError("iterative pruning needs config.sparsity")
    masks = Masks()
    for target in iterative_sparsities(config.sparsity, cycles):
        step_cfg = MagnitudeConfig(**{**config.__dict__, "sparsity": target})
        new = magnitude_masks(model, step_cfg)
        masks = Masks({n: m & masks[n] if n in masks else m for n, m in new.items()})
        masks.apply_(model)
        retrain(model, MaskCallback(masks))
    return masks


@register_method(MagnitudeConfig)
def _magnitude(model: nn.Module, config: MagnitudeConfig, **kwargs) -> PruneSummary:
    no_extra_arguments("magnitude", kwargs)
    masks = prune_magnitude_(model, config)
    params = count_parameters(model)
    return PruneSummary(
        method="magnitude",
        params_before=params,
        params_after=params,
        masks=masks,
        callback=MaskCallback(masks),
        sparsity=masks.sparsity(),
    )


@register_method(GradualConfig)
def _gradual(model: nn.Module, config: GradualConfig, **kwargs) -> PruneSummary:
    """Nothing changes yet: the returned callback prunes on schedule once it is among the Trainer's."""
    no_extra_arguments("gradual", kwargs)
    callback = GradualPruningCallback(model, config)
    params = count_parameters(model)
    return PruneSummary(
        method="gradual", params_before=params, params_after=params, masks=callback.masks, callback=callback
    )
