"""What a compression search is asked for: a floor, an objective, a budget, a seed and a space.

Every field is checked on construction (``ConfigError`` naming it), so a bad search is refused
before any work. The checks that need the model or the baseline figure (a floor the baseline
misses, an objective the model cannot be measured on, a space with nothing to change) are made by
:func:`slimkit.search.api.search` once the baseline is evaluated, before the first candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimkit.config import in_range, non_negative, one_of, positive, positive_int, require
from slimkit.prune.config import DEPTH_IMPORTANCES
from slimkit.prune.importance import importance_class

OBJECTIVES = ("latency", "size", "macs")
# In order of falling weight bytes; ``codebook`` (shared weights, 2**codebook_bits values per layer,
# entropy-coded on disk) shrinks files, not time: its layers gather their weights and run the float op.
PRECISIONS = ("fp32", "bf16", "int8", "int4", "codebook")
INT8_METHODS = ("auto", "int8_static", "int8_dynamic")


@dataclass(frozen=True)
class FloorConfig:
    """The metric the chosen model must keep, on the validation split: exactly one of

    ``value`` (absolute: accuracy >= 0.98, perplexity <= 20), ``within`` (at most this far from the
    baseline, in the metric's own units: 0.01 is one point of accuracy, 1.0 one STS-B point) or
    ``within_percent`` (relative to the baseline: perplexity within 10%). Which side is "worse"
    follows the task's metric (higher is better for accuracy, lower for perplexity).
    """

    value: float | None = None
    within: float | None = None
    within_percent: float | None = None

    def __post_init__(self):
        given = [n for n in ("value", "within", "within_percent") if getattr(self, n) is not None]
        require(len(given) == 1, "value", "give exactly one of value, within or within_percent")
        if self.value is not None:
            in_range(self.value, "value", -1e30, 1e30)
        if self.within is not None:
            non_negative(self.within, "within")
        if self.within_percent is not None:
            in_range(self.within_percent, "within_percent", 0.0, 100.0)

    def threshold(self, baseline: float, higher_is_better: bool) -> float:
        """The worst metric allowed, for a baseline figure."""
        if self.value is not None:
            return float(self.value)
        slack = self.within if self.within is not None else abs(baseline) * self.within_percent / 100.0
        return baseline - slack if higher_is_better else baseline + slack

    def describe(self) -> str:
        if self.value is not None:
            return f"value {self.value}"
        return f"within {self.within}" if self.within is not None else f"within {self.within_percent}%"


@dataclass(frozen=True)
class BudgetConfig:
    """How much searching: ``max_evaluations`` (candidates, the baseline not counted) and/or
    ``minutes`` of wall time. Only ``max_evaluations`` makes the number of candidates, and so the
    result, independent of the machine's speed (a resumed search then ends as an uninterrupted one)."""

    max_evaluations: int | None = 40
    minutes: float | None = None

    def __post_init__(self):
        require(
            self.max_evaluations is not None or self.minutes is not None,
            "max_evaluations",
            "give max_evaluations or minutes (or both)",
        )
        if self.max_evaluations is not None:
            positive_int(self.max_evaluations, "max_evaluations")
        if self.minutes is not None:
            positive(self.minutes, "minutes")


@dataclass(frozen=True)
class RecoveryConfig:
    """Recovery training (the expensive fidelity), given only to the ``top_k`` most promising
    candidates that pruned something: ``distill`` learns from the model the search started from
    (soft labels at ``temperature``, mixed with the task loss by ``alpha``); without it, plain
    fine-tuning on the task loss. ``epochs`` and ``lr`` are its budget."""

    enabled: bool = True
    top_k: int = 2
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.9
    time_share: float = 0.5  # with a budget in minutes: the share kept for recovery training

    def __post_init__(self):
        require(isinstance(self.enabled, bool), "enabled", "must be true or false")
        in_range(self.time_share, "time_share", 0.0, 1.0, hi_open=True)
        require(isinstance(self.distill, bool), "distill", "must be true or false")
        positive_int(self.top_k, "top_k")
        positive_int(self.epochs, "epochs")
        positive_int(self.batch_size, "batch_size")
        positive(self.lr, "lr")
        positive(self.temperature, "temperature")
        in_range(self.alpha, "alpha", 0.0, 1.0)


@dataclass(frozen=True)
class SpaceConfig:
    """What the search may change.

    ``precision``: the per-layer precisions allowed besides fp32 (Linear and Conv2d layers;
    ``int4`` is weight-only, Linear only, in groups of ``int4_group_size``; ``int8`` runs on
    ``int8_method``, ``auto`` picks the faster of static and dynamic on this machine;
    ``codebook`` shares ``2**codebook_bits`` weight values per layer, for the smallest files).
    ``prune_ratios``: structured pruning ratios tried per channel/head group (0 = unpruned).
    ``blocks``: how many whole blocks (transformer layers) may be dropped, ranked by
    ``depth_importance`` (``perplexity``: the task's calibration loss with the block skipped).
    ``sparsity``: unstructured magnitude sparsity levels (one level for the whole model).
    ``include``/``exclude``: layer-name patterns limiting which layers and groups may change.
    """

    precision: list[str] = field(default_factory=lambda: ["bf16", "int8", "int4"])
    int8_method: str = "auto"
    int4_group_size: int = 32
    prune_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    importance: str = "l2"
    blocks: list[int] = field(default_factory=list)
    depth_importance: str = "perplexity"
    codebook_bits: int = 5
    sparsity: list[float] = field(default_factory=list)
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def __post_init__(self):
        require(isinstance(self.precision, list), "precision", "must be a list of precisions")
        for i, p in enumerate(self.precision):
            one_of(p, f"precision[{i}]", PRECISIONS)
        one_of(self.int8_method, "int8_method", INT8_METHODS)
        one_of(self.int4_group_size, "int4_group_size", (32, 64, 128))
        for name in ("prune_ratios", "sparsity"):
            values = getattr(self, name)
            require(isinstance(values, list), name, "must be a list of fractions")
            for i, v in enumerate(values):
                in_range(v, f"{name}[{i}]", 0.0, 1.0, hi_open=True)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            require(isinstance(patterns, list), name, "must be a list of layer-name patterns")
            for i, p in enumerate(patterns):
                require(isinstance(p, str) and p != "", f"{name}[{i}]", "must be a non-empty pattern")
        importance_class(self.importance)  # the prune table is the one list of criteria
        require(isinstance(self.blocks, list), "blocks", "must be a list of block counts")
        for i, b in enumerate(self.blocks):
            require(type(b) is int and b >= 0, f"blocks[{i}]", f"must be a whole number >= 0, got {b!r}")
        one_of(self.depth_importance, "depth_importance", DEPTH_IMPORTANCES)
        require(
            type(self.codebook_bits) is int and 2 <= self.codebook_bits <= 8,
            "codebook_bits",
            f"must be an integer from 2 to 8, got {self.codebook_bits!r}",
        )
        require(
            bool(self.levels_precision or self.prune_levels or self.sparsity_levels or self.block_levels),
            "precision",
            "the space is empty: allow a precision below fp32, a prune ratio, a block count or a sparsity above 0",
        )

    @property
    def levels_precision(self) -> list[str]:
        """The precisions below fp32 that may be chosen, in the order of :data:`PRECISIONS`."""
        return [p for p in PRECISIONS[1:] if p in self.precision]

    @property
    def prune_levels(self) -> list[float]:
        return sorted({float(r) for r in self.prune_ratios if r > 0})

    @property
    def block_levels(self) -> list[int]:
        return sorted({int(b) for b in self.blocks if b > 0})

    @property
    def sparsity_levels(self) -> list[float]:
        return sorted({float(s) for s in self.sparsity if s > 0})


@dataclass(frozen=True)
class SearchConfig:
    """A search: ``floor`` on the validation metric, ``objective`` to minimise, ``budget``, ``seed``
    and ``space``. ``calibration_samples``: train rows for quantization calibration and the
    sensitivity signals. Latency and MACs are measured on one batch of ``example_size`` train rows;
    for text, ``example_tokens`` makes every sequence of it that long (its own tokens repeated, no
    padding), so the objective is the cost of full-length inputs rather than of short sentences."""

    floor: FloorConfig
    objective: str = "latency"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    seed: int = 0
    space: SpaceConfig = field(default_factory=SpaceConfig)
    calibration_samples: int = 256
    example_size: int = 64
    example_tokens: int | None = None

    def __post_init__(self):
        positive_int(self.example_size, "example_size")
        if self.example_tokens is not None:
            positive_int(self.example_tokens, "example_tokens")
        require(isinstance(self.floor, FloorConfig), "floor", "must be a floor mapping (value/within)")
        one_of(self.objective, "objective", OBJECTIVES)
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an integer")
        positive_int(self.calibration_samples, "calibration_samples")
