"""Candidates, the units they change, and building a candidate's model through the techniques' verbs.

A :class:`Candidate` says, per unit, how far it is compressed: a precision per layer (layers not
named stay fp32), a structured-pruning ratio per channel/head group (named by the group's first
producer layer, the pattern ``StructuredConfig.ratios`` takes), how many whole blocks go, one
unstructured sparsity and whether it gets recovery training. Layers are always named as in the
model the search started from; :func:`renamer` maps those names onto a model whose blocks were
dropped (the block list is renumbered). Its :meth:`~Candidate.key` is canonical (sorted, rounded), so
the same candidate found twice, or found again after a restart, is evaluated once.

:func:`build` makes the candidate from a deep copy (the model given is never changed), in a fixed
order: structured pruning, dropped blocks, unstructured sparsity, recovery training (masks kept),
quantization; it also returns the same actions as technique configs, as they were applied (the
blocks that went by number, layers by their new names), which a recipe writes as its steps.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimkit.distill import DistillConfig, distill_
from slimkit.errors import ModelError
from slimkit.models.blocks import find_layer_list
from slimkit.prune import DepthConfig, MagnitudeConfig, StructuredConfig, analyze, finalize_, prune_
from slimkit.prune.depth import kept_blocks
from slimkit.quant import (
    BF16Config,
    CodebookConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    WeightOnlyConfig,
    convert_,
    quantize_,
)
from slimkit.quant.method import method_for
from slimkit.search.config import PRECISIONS, SearchConfig
from slimkit.tasks import TaskAdapter
from slimkit.train import TrainConfig, Trainer

OUTPUT_LOSS = {"classification": "kd", "similarity": "cosine", "regression": "mse"}


@dataclass(frozen=True)
class Candidate:
    precision: tuple[tuple[str, str], ...] = ()  # (layer, precision) for layers not in fp32
    prune: tuple[tuple[str, float], ...] = ()  # (group, ratio) for groups pruned
    sparsity: float = 0.0
    recover: bool = False
    blocks: int = 0  # whole blocks dropped

    @classmethod
    def make(cls, precision=None, prune=None, sparsity=0.0, recover=False, blocks=0) -> Candidate:
        """The canonical form: fp32 layers and ratio-0 groups left out, sorted, ratios rounded."""
        prec = tuple(sorted((k, v) for k, v in (precision or {}).items() if v != "fp32"))
        ratios = tuple(sorted((k, round(float(v), 6)) for k, v in (prune or {}).items() if v > 0))
        return cls(prec, ratios, round(float(sparsity), 6), bool(recover), int(blocks))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "precision": dict(self.precision),
            "prune": dict(self.prune),
            "sparsity": self.sparsity,
            "recover": self.recover,
        }
        return out | ({"blocks": self.blocks} if self.blocks else {})  # keys of older logs unchanged

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls.make(
            data["precision"], data["prune"], data["sparsity"], data["recover"], data.get("blocks", 0)
        )

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def is_baseline(self) -> bool:
        return not (self.precision or self.prune or self.sparsity or self.recover or self.blocks)

    @property
    def shrinks(self) -> bool:
        """Whether it removes weights (what recovery training can help)."""
        return bool(self.prune or self.sparsity or self.blocks)

    def setting(self, kind: str, unit: str | None) -> Any:
        if kind == "precision":
            return dict(self.precision).get(unit, "fp32")
        if kind == "prune":
            return dict(self.prune).get(unit, 0.0)
        return self.blocks if kind == "blocks" else self.sparsity

    def with_setting(self, kind: str, unit: str | None, level: Any) -> Candidate:
        prec, ratios, sparsity, blocks = dict(self.precision), dict(self.prune), self.sparsity, self.blocks
        if kind == "precision":
            prec[unit] = level
        elif kind == "prune":
            ratios[unit] = level
        elif kind == "blocks":
            blocks = level
        else:
            sparsity = level
        return Candidate.make(prec, ratios, sparsity, self.recover, blocks)

    def with_recovery(self, recover: bool = True) -> Candidate:
        return Candidate(self.precision, self.prune, self.sparsity, recover, self.blocks)

    def label(self) -> str:
        """A short human description for tables."""
        parts = []
        counts: dict[str, int] = {}
        for _, p in self.precision:
            counts[p] = counts.get(p, 0) + 1
        parts += [f"{n} {p}" for p, n in sorted(counts.items(), key=lambda kv: PRECISIONS.index(kv[0]))]
        if len(self.prune) > 3:  # a table row stays readable; the settings section lists every group
            ratios = sorted({r for _, r in self.prune})
            spread = f"{ratios[0]:g}" if len(ratios) == 1 else f"{ratios[0]:g}-{ratios[-1]:g}"
            parts += [f"prune {len(self.prune)} groups {spread}"]
        else:
            parts += [f"prune {g} {r:g}" for g, r in self.prune]
        parts += [f"drop {self.blocks} block{'s' if self.blocks > 1 else ''}"] if self.blocks else []
        parts += [f"sparsity {self.sparsity:g}"] if self.sparsity else []
        parts += ["recovered"] if self.recover else []
        return ", ".join(parts) or "baseline (unchanged)"


@dataclass
class Units:
    """What may change in this model: layers with the precisions they take, prunable groups."""

    layers: dict[str, list[str]] = field(default_factory=dict)  # layer -> allowed precisions (not fp32)
    groups: dict[str, int] = field(default_factory=dict)  # group (first producer) -> units
    blocks: int = 0  # blocks in the model's block list (0: none found)

    def block_levels(self, config: SearchConfig) -> list[int]:
        """The block counts that leave at least one block."""
        return [b for b in config.space.block_levels if b < self.blocks]

    def moves(self, config: SearchConfig) -> list[tuple[str, str | None, Any]]:
        """Every single-unit change from the baseline: ``(kind, unit, level)``, in a fixed order."""
        out: list[tuple[str, str | None, Any]] = []
        for layer, allowed in sorted(self.layers.items()):
            out += [("precision", layer, p) for p in allowed]
        for group in sorted(self.groups):
            out += [("prune", group, r) for r in config.space.prune_levels]
        out += [("blocks", None, b) for b in self.block_levels(config)]
        out += [("sparsity", None, s) for s in config.space.sparsity_levels]
        return out

    def levels(self, kind: str, unit: str | None, config: SearchConfig) -> list[Any]:
        """Every level of one unit, the uncompressed one first."""
        if kind == "precision":
            return ["fp32", *self.layers[unit]]
        if kind == "prune":
            return [0.0, *config.space.prune_levels]
        if kind == "blocks":
            return [0, *self.block_levels(config)]
        return [0.0, *config.space.sparsity_levels]


def selected(name: str, config: SearchConfig) -> bool:
    space = config.space
    return any(fnmatch.fnmatchcase(name, p) for p in space.include) and not any(
        fnmatch.fnmatchcase(name, p) for p in space.exclude
    )


def prunable_groups(
    model: nn.Module, example: Any, task: TaskAdapter, config: SearchConfig
) -> dict[str, int]:
    """``{group name: units}``; a group is named by its first producer, which no other group's
    producers match as a ``ratios`` pattern (a name that would also reach another group is left out)."""
    if not config.space.prune_levels:
        return {}
    groups = [
        g
        for g in analyze(model, example, task.one_call)
        if g.prunable and g.kind in ("channel", "head") and all(selected(p, config) for p in g.producers)
    ]
    named = {}
    for g in groups:
        first = sorted(g.producers)[0]
        others = [p for h in groups if h is not g for p in h.producers]
        if not any(p == first or p.endswith("." + first) for p in others):
            named[first] = g.units
    return named


def block_count(model: nn.Module) -> int:
    """Blocks in the model's block list (its longest ``ModuleList`` of one block type), 0 if none."""
    try:
        return len(find_layer_list(model)[1])
    except ModelError:  # no block list: nothing to drop
        return 0


def renamer(model: nn.Module) -> Callable[[str], str | None]:
    """Maps a layer name of the model the search started from onto ``model`` (a built candidate):
    unchanged, renumbered when blocks before it were dropped, or None when its block went."""
    found = kept_blocks(model)
    if found is None or not found[0]:
        return lambda name: name
    prefix, position = found[0] + ".", {old: new for new, old in enumerate(found[1])}

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            return name
        index, dot, rest = name[len(prefix) :].partition(".")
        new = position.get(int(index)) if index.isdigit() else None
        return None if new is None else f"{prefix}{new}{dot}{rest}"

    return rename


def quant_config(
    candidate: Candidate,
    config: SearchConfig,
    int8_method: str,
    rename: Callable = lambda n: n,
    codebook: bool = False,
) -> Any:
    """One quantization config for every layer the candidate lowers (named by ``rename``; layers
    of dropped blocks left out): the first precision's method over its layers, the others as
    per-layer overrides (one ``quantize_`` call, one recipe step). The shared-weight layers have
    their own config (``codebook=True``): that method prepares, then converts, on its own."""
    by_precision: dict[str, list[str]] = {}
    for layer, p in candidate.precision:
        if rename(layer) is not None and (p == "codebook") == codebook:
            by_precision.setdefault(p, []).append(rename(layer))
    if not by_precision:
        return None
    made = {p: method_config(p, config, int8_method) for p in by_precision}
    first = next(p for p in PRECISIONS[1:] if p in by_precision)
    overrides = {layer: made[p] for p, layers in by_precision.items() if p != first for layer in layers}
    return method_config(first, config, int8_method, include=by_precision[first], overrides=overrides)


def method_config(precision: str, config: SearchConfig, int8_method: str, **kw: Any) -> Any:
    if precision == "bf16":
        return BF16Config(**kw)
    if precision == "int4":
        return WeightOnlyConfig(bits=4, group_size=config.space.int4_group_size, **kw)
    if precision == "codebook":
        return CodebookConfig(bits=config.space.codebook_bits, **kw)
    return (Int8StaticConfig if int8_method == "int8_static" else Int8DynamicConfig)(**kw)


def lower_(model: nn.Module, config: Any, calibration: list, forward: Callable) -> Any:
    """``quantize_`` in place, then ``convert_`` for a method that trains (codebook, qat: the search
    gives it no training); returns the summary of the layers as converted."""
    summary = quantize_(model, config, calibration_data=calibration, forward=forward)
    return convert_(model) if method_for(config).trains else summary


def distills(config: SearchConfig, candidate: Candidate) -> bool:
    """Recovery by distillation, unless the candidate is sparse: then fine-tuning that keeps the
    zeros (what a recipe's prune step with ``train:`` does)."""
    return config.space.recovery.distill and not candidate.sparsity


@dataclass
class Builder:
    """What building a candidate needs besides the candidate: the task, data and settings."""

    task: TaskAdapter
    train_data: Any
    calibration: list
    config: SearchConfig
    int8_method: str = "int8_static"

    def structured(self, candidate: Candidate) -> StructuredConfig:
        return StructuredConfig(
            ratio=0.0,
            ratios=dict(candidate.prune),
            importance=self.config.space.importance,
            seed=self.config.seed,
        )

    def magnitude(self, candidate: Candidate) -> MagnitudeConfig:
        space = self.config.space
        return MagnitudeConfig(
            sparsity=candidate.sparsity, include=list(space.include), exclude=list(space.exclude)
        )

    def recovery_train(self) -> TrainConfig:
        rec = self.config.space.recovery
        # restore_best off: the last epoch's weights, with or without a validation split watching
        # (a recipe's step trains with one; the search must not pick epochs on it).
        return TrainConfig(
            epochs=rec.epochs,
            lr=rec.lr,
            batch_size=rec.batch_size,
            seed=self.config.seed,
            progress=False,
            restore_best=False,
        )

    def distill_config(self) -> DistillConfig:
        rec = self.config.space.recovery
        loss = OUTPUT_LOSS.get(self.task.task, "kd")
        return DistillConfig(temperature=rec.temperature, alpha=rec.alpha, output_loss=loss)

    def depth(self, candidate: Candidate) -> DepthConfig:
        space = self.config.space
        return DepthConfig(blocks=candidate.blocks, importance=space.depth_importance)

    def build(self, model: nn.Module, candidate: Candidate) -> tuple[nn.Module, dict[str, Any]]:
        """The candidate's model (a new one) and notes: ``steps``, the technique configs as they
        were applied (``(kind, config)``, the blocks that went by number), and ``kept_float``, the
        layers (original names) that the quantization method left float."""
        built, sparse, done = copy.deepcopy(model), None, []
        kw = {"calibration": self.calibration, "forward": self.task.forward, "loss_fn": self._loss}
        if candidate.prune:
            done.append(("structured", self.structured(candidate)))
            prune_(built, done[-1][1], **(kw | {"forward": self.task.one_call}))
        if candidate.blocks:
            summary = prune_(built, self.depth(candidate), **kw)
            done.append(("depth", DepthConfig(indices=summary.details["dropped"])))
        if candidate.sparsity:
            done.append(("magnitude", self.magnitude(candidate)))
            sparse = prune_(built, done[-1][1])
        if candidate.recover:
            done.append(("recover", self.recovery_train()))
            self._recover(built, model, done[-1][1], sparse)
        if sparse is not None:
            finalize_(built, sparse.masks)  # the zeros are the weights now (before quantization)
        rename, skipped = renamer(built), set()
        for kind in ("quantize", "codebook"):
            quant = quant_config(candidate, self.config, self.int8_method, rename, kind == "codebook")
            if quant is not None:
                done.append((kind, quant))
                skipped |= set(lower_(built, quant, self.calibration, self.task.forward).skipped)
        kept = sorted(layer for layer, _ in candidate.precision if rename(layer) in skipped)
        return built.eval(), {"steps": done, **({"kept_float": kept} if kept else {})}

    def _loss(self, model: nn.Module, batch: Any) -> Any:
        return self.task.loss_fn(self.task.forward(model, batch), batch)

    def _recover(self, student: nn.Module, teacher: nn.Module, train: TrainConfig, sparse: Any) -> None:
        """Recovery training in place; a sparse candidate's mask callback keeps its zeros at zero."""
        callbacks = [sparse.callback] if sparse is not None else []
        kw: dict[str, Callable | Any] = {
            "forward": self.task.forward,
            "loss_fn": self.task.loss_fn,
            "collate_fn": self.task.collate_fn,
        }
        if sparse is None and self.config.space.recovery.distill:  # see distills()
            frozen = copy.deepcopy(teacher).eval()
            distill_(
                student,
                frozen,
                self.train_data,
                self.distill_config(),
                train,
                task=self.task.task,
                callbacks=callbacks,
                **kw,
            )
        else:
            Trainer(student, train, callbacks=callbacks, task=self.task.task, **kw).fit(self.train_data)
