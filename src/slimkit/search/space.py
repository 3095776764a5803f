"""Candidates, the units they change, and building a candidate's model through the techniques' verbs.

A :class:`Candidate` says, per unit, how far it is compressed: a precision per layer (layers not
named stay fp32), a structured-pruning ratio per channel/head group (named by the group's first
producer layer, the pattern ``StructuredConfig.ratios`` takes), one unstructured sparsity and
whether it gets recovery training. Its :meth:`~Candidate.key` is canonical (sorted, rounded), so
the same candidate found twice, or found again after a restart, is evaluated once.

:func:`build` makes the candidate from a deep copy (the model given is never changed), in a fixed
order: structured pruning, unstructured sparsity, recovery training (masks kept), quantization.
:func:`steps` lists the same actions as technique configs, which a recipe writes as its steps.
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
from slimkit.prune import MagnitudeConfig, StructuredConfig, analyze, finalize_, prune_
from slimkit.quant import BF16Config, Int8DynamicConfig, Int8StaticConfig, WeightOnlyConfig, quantize_
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

    @classmethod
    def make(cls, precision=None, prune=None, sparsity=0.0, recover=False) -> Candidate:
        """The canonical form: fp32 layers and ratio-0 groups left out, sorted, ratios rounded."""
        prec = tuple(sorted((k, v) for k, v in (precision or {}).items() if v != "fp32"))
        ratios = tuple(sorted((k, round(float(v), 6)) for k, v in (prune or {}).items() if v > 0))
        return cls(prec, ratios, round(float(sparsity), 6), bool(recover))

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": dict(self.precision),
            "prune": dict(self.prune),
            "sparsity": self.sparsity,
            "recover": self.recover,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls.make(data["precision"], data["prune"], data["sparsity"], data["recover"])

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def is_baseline(self) -> bool:
        return not (self.precision or self.prune or self.sparsity or self.recover)

    @property
    def shrinks(self) -> bool:
        """Whether it removes weights (what recovery training can help)."""
        return bool(self.prune or self.sparsity)

    def setting(self, kind: str, unit: str | None) -> Any:
        if kind == "precision":
            return dict(self.precision).get(unit, "fp32")
        if kind == "prune":
            return dict(self.prune).get(unit, 0.0)
        return self.sparsity

    def with_setting(self, kind: str, unit: str | None, level: Any) -> Candidate:
        prec, ratios, sparsity = dict(self.precision), dict(self.prune), self.sparsity
        if kind == "precision":
            prec[unit] = level
        elif kind == "prune":
            ratios[unit] = level
        else:
            sparsity = level
        return Candidate.make(prec, ratios, sparsity, self.recover)

    def with_recovery(self) -> Candidate:
        return Candidate(self.precision, self.prune, self.sparsity, True)

    def label(self) -> str:
        """A short human description for tables."""
        parts = []
        counts: dict[str, int] = {}
        for _, p in self.precision:
            counts[p] = counts.get(p, 0) + 1
        parts += [f"{n} {p}" for p, n in sorted(counts.items(), key=lambda kv: PRECISIONS.index(kv[0]))]
        parts += [f"prune {g} {r:g}" for g, r in self.prune]
        parts += [f"sparsity {self.sparsity:g}"] if self.sparsity else []
        parts += ["recovered"] if self.recover else []
        return ", ".join(parts) or "baseline (unchanged)"


@dataclass
class Units:
    """What may change in this model: layers with the precisions they take, prunable groups."""

    layers: dict[str, list[str]] = field(default_factory=dict)  # layer -> allowed precisions (not fp32)
    groups: dict[str, int] = field(default_factory=dict)  # group (first producer) -> units

    def moves(self, config: SearchConfig) -> list[tuple[str, str | None, Any]]:
        """Every single-unit change from the baseline: ``(kind, unit, level)``, in a fixed order."""
        out: list[tuple[str, str | None, Any]] = []
        for layer, allowed in sorted(self.layers.items()):
            out += [("precision", layer, p) for p in allowed]
        for group in sorted(self.groups):
            out += [("prune", group, r) for r in config.space.prune_levels]
        out += [("sparsity", None, s) for s in config.space.sparsity_levels]
        return out

    def levels(self, kind: str, unit: str | None, config: SearchConfig) -> list[Any]:
        """Every level of one unit, the uncompressed one first."""
        if kind == "precision":
            return ["fp32", *self.layers[unit]]
        if kind == "prune":
            return [0.0, *config.space.prune_levels]
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
        for g in analyze(model, example, task.forward)
        if g.prunable and g.kind in ("channel", "head") and all(selected(p, config) for p in g.producers)
    ]
    named = {}
    for g in groups:
        first = sorted(g.producers)[0]
        others = [p for h in groups if h is not g for p in h.producers]
        if not any(p == first or p.endswith("." + first) for p in others):
            named[first] = g.units
    return named


def quant_config(candidate: Candidate, config: SearchConfig, int8_method: str) -> Any:
    """One quantization config for every layer the candidate lowers: the first precision's method
    over its layers, the others as per-layer overrides (one ``quantize_`` call, one recipe step)."""
    by_precision: dict[str, list[str]] = {}
    for layer, p in candidate.precision:
        by_precision.setdefault(p, []).append(layer)
    if not by_precision:
        return None
    made = {p: method_config(p, config, int8_method) for p in by_precision}
    first = next(p for p in ("int8", "int4", "bf16") if p in by_precision)
    overrides = {layer: made[p] for p, layers in by_precision.items() if p != first for layer in layers}
    return method_config(first, config, int8_method, include=by_precision[first], overrides=overrides)


def method_config(precision: str, config: SearchConfig, int8_method: str, **kw: Any) -> Any:
    if precision == "bf16":
        return BF16Config(**kw)
    if precision == "int4":
        return WeightOnlyConfig(bits=4, group_size=config.space.int4_group_size, **kw)
    return (Int8StaticConfig if int8_method == "int8_static" else Int8DynamicConfig)(**kw)


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

    def steps(self, candidate: Candidate) -> list[tuple[str, Any]]:
        """The candidate as technique configs, in the order :func:`build` applies them."""
        out: list[tuple[str, Any]] = []
        if candidate.prune:
            out.append(("structured", self.structured(candidate)))
        if candidate.sparsity:
            out.append(("magnitude", self.magnitude(candidate)))
        if candidate.recover:
            out.append(("recover", self.recovery_train()))
        quant = quant_config(candidate, self.config, self.int8_method)
        if quant is not None:
            out.append(("quantize", quant))
        return out

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

    def build(self, model: nn.Module, candidate: Candidate) -> tuple[nn.Module, dict[str, Any]]:
        """The candidate's model (a new one) and what the techniques reported (layers kept float)."""
        built = copy.deepcopy(model)
        sparse, notes = None, {}
        for kind, cfg in self.steps(candidate):
            if kind == "structured":
                prune_(
                    built, cfg, calibration=self.calibration, forward=self.task.forward, loss_fn=self._loss
                )
            elif kind == "magnitude":
                sparse = prune_(built, cfg)
            elif kind == "recover":
                self._recover(built, model, cfg, sparse)
            else:
                summary = quantize_(built, cfg, calibration_data=self.calibration, forward=self.task.forward)
                notes["kept_float"] = sorted(n for n in summary.skipped if n in dict(candidate.precision))
            if sparse is not None and (kind == "recover" or (kind == "magnitude" and not candidate.recover)):
                finalize_(built, sparse.masks)  # the zeros are the weights now (before quantization)
        return built.eval(), notes

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
