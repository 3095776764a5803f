"""Typed, validated configs for every pruning method (one config type per method).

``prune_(model, config)`` dispatches on the config's type, so a recipe step
only has to build the right dataclass (``from_dict``) from its YAML mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from slimkit.calibration.held import check_block_fields
from slimkit.config import in_range, non_negative, one_of, positive_int, require
from slimkit.prune.importance import importance_class

#: Module types that unstructured pruning understands (weights of any shape work,
#: but these are the layers whose weights are matrices or kernels).
UNSTRUCTURED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Embedding", "Bilinear")


def _check_patterns(patterns: list[str], field_name: str) -> None:
    require(isinstance(patterns, (list, tuple)), field_name, "must be a list of name patterns")
    for i, p in enumerate(patterns):
        require(isinstance(p, str) and p != "", f"{field_name}[{i}]", "must be a non-empty string")


def parse_n_m(value: str, field_name: str = "n_m") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N weights in every block of M consecutive inputs."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(value))
    require(match is not None, field_name, f"must look like '2:4' (N:M), got {value!r}")
    n, m = int(match.group(1)), int(match.group(2))
    require(0 < n < m, field_name, f"needs 0 < N < M, got {value!r}")
    return n, m


@dataclass
class MagnitudeConfig:
    """Unstructured magnitude pruning (|w|), by target sparsity, threshold, or N:M pattern.

    Exactly one of ``sparsity``, ``threshold`` and ``n_m`` is set. ``scope``
    ``"layer"`` removes that fraction in every selected layer; ``"global"`` ranks
    all selected weights together (one cut-off for the whole model).
    """

    sparsity: float | None = None
    threshold: float | None = None
    n_m: str | None = None
    scope: Literal["layer", "global"] = "layer"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    module_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d"])
    prune_bias: bool = False

    def __post_init__(self) -> None:
        given = [n for n in ("sparsity", "threshold", "n_m") if getattr(self, n) is not None]
        require(
            len(given) == 1,
            "sparsity",
            f"set exactly one of sparsity, threshold, n_m (got {given or 'none'})",
        )
        if self.sparsity is not None:
            in_range(self.sparsity, "sparsity", 0.0, 1.0, hi_open=True)
        if self.threshold is not None:
            non_negative(self.threshold, "threshold")
        if self.n_m is not None:
            parse_n_m(self.n_m)
        one_of(self.scope, "scope", ("layer", "global"))
        _check_patterns(self.include, "include")
        _check_patterns(self.exclude, "exclude")
        require(len(self.module_types) > 0, "module_types", "must name at least one module type")
        for i, t in enumerate(self.module_types):
            one_of(t, f"module_types[{i}]", UNSTRUCTURED_TYPES)


@dataclass
class CalibratedSparsityConfig:
    """Fields shared by the calibrated unstructured methods, :class:`WandaConfig` and :class:`SparseGPTConfig`.

    Exactly one of ``sparsity`` (the fraction of every selected Linear's weights removed) and
    ``n_m`` (``"2:4"``: N kept in every M consecutive inputs of each output row; M must divide
    every selected layer's input width). Only ``nn.Linear`` layers are pruned, and never one whose
    weight is tied to another module's (an ``lm_head`` sharing the embedding table).
    ``sequential``: calibrate block by block over the model's stack of blocks, each block's
    statistics taken on the outputs of the blocks already pruned (null: on for causal LMs);
    ``micro_batch`` / ``hold_inputs`` bound its memory as in quantization's block calibration.
    """

    sparsity: float | None = None
    n_m: str | None = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    sequential: bool | None = None
    micro_batch: int | None = None
    hold_inputs: str = "memory"

    def __post_init__(self) -> None:
        given = [n for n in ("sparsity", "n_m") if getattr(self, n) is not None]
        require(len(given) == 1, "sparsity", f"set exactly one of sparsity, n_m (got {given or 'none'})")
        if self.sparsity is not None:
            in_range(self.sparsity, "sparsity", 0.0, 1.0, hi_open=True)
        if self.n_m is not None:
            parse_n_m(self.n_m)
        _check_patterns(self.include, "include")
        _check_patterns(self.exclude, "exclude")
        check_block_fields(self)

    @property
    def pattern(self) -> tuple[int, int] | None:
        """``(n, m)`` for N:M pruning, else None."""
        return parse_n_m(self.n_m) if self.n_m is not None else None


@dataclass
class WandaConfig(CalibratedSparsityConfig):
    """Wanda (Sun et al. 2023): prune the lowest ``|W_ij| x ||X_j||_2`` of every output row; no update."""

    method: ClassVar[str] = "wanda"


@dataclass
class SparseGPTConfig(CalibratedSparsityConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS-style column sweep with the inverse Hessian, weights updated.

    ``block_size``: columns whose mask is chosen together (and swept before their errors reach
    the rest); ``damp``: added to the Hessian's diagonal as a fraction of its mean.
    """

    method: ClassVar[str] = "sparsegpt"
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self.block_size, "block_size")
        in_range(self.damp, "damp", 0.0, 1.0)
        require(
            self.damp > 0,
            "damp",
            "must be > 0 (an undamped Hessian of correlated inputs may have no Cholesky factor)",
        )


@dataclass
class GradualConfig:
    """Zhu & Gupta (2017) polynomial schedule: s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3.

    Sparsity grows from ``initial_sparsity`` at ``start_step`` to
    ``final_sparsity`` at ``end_step``, updated every ``frequency`` steps.
    The selection options (scope, include, ...) come from ``magnitude``.
    """

    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    exponent: float = 3.0
    scope: Literal["layer", "global"] = "layer"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    module_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d"])

    def __post_init__(self) -> None:
        in_range(self.final_sparsity, "final_sparsity", 0.0, 1.0, hi_open=True)
        in_range(self.initial_sparsity, "initial_sparsity", 0.0, self.final_sparsity)
        non_negative(self.start_step, "start_step")
        require(
            isinstance(self.end_step, int) and self.end_step > self.start_step,
            "end_step",
            f"must be an integer > start_step ({self.start_step}), got {self.end_step!r}",
        )
        positive_int(self.frequency, "frequency")
        in_range(self.exponent, "exponent", 1.0, 10.0)
        # Reuse MagnitudeConfig's checks for the selection fields.
        self.magnitude(self.initial_sparsity)

    def magnitude(self, sparsity: float) -> MagnitudeConfig:
        return MagnitudeConfig(
            sparsity=sparsity,
            scope=self.scope,
            include=list(self.include),
            exclude=list(self.exclude),
            module_types=list(self.module_types),
        )

    def sparsity_at(self, step: int) -> float:
        if step <= self.start_step:
            return self.initial_sparsity
        progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** self.exponent
        )


@dataclass
class StructuredConfig:
    """Structured pruning: physically remove neurons, channels and attention heads.

    ``ratio`` is the fraction of channels removed in every prunable channel
    group (Linear neurons, Conv2d channels, transformer FFN neurons);
    ``head_ratio`` the fraction of attention heads removed in every attention
    block (``None``: same as ``ratio``). ``ratios`` overrides ``ratio`` for the
    groups whose layer name matches a pattern (first match wins). With
    ``global_ranking`` the channels of all groups compete in one ranking (scores
    normalised per group) and ``ratio`` is the overall fraction removed.
    ``include``/``exclude`` select groups by the names of their layers.
    ``gqa`` prunes grouped-query attentions (Llama, Qwen2...; :mod:`slimkit.prune.attention`), whose
    heads the traced graph leaves alone: ``groups`` removes ``floor(head_ratio x kv_heads)`` whole
    key/value groups with their query heads, ``heads`` removes ``floor(head_ratio x heads per
    group)`` query heads from every group (per attention, also with ``global_ranking``); ``None``
    leaves them.
    """

    ratio: float = 0.5
    head_ratio: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    importance: str = "l2"  # a name registered with slimkit.prune.importance.register_importance
    global_ranking: bool = False
    min_width: int = 1
    min_heads: int = 1
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    prune_heads: bool = True
    prune_channels: bool = True
    round_to: int = 1
    calibration_batches: int = 8
    seed: int = 0
    gqa: str | None = None  # "groups" or "heads"

    def __post_init__(self) -> None:
        in_range(self.ratio, "ratio", 0.0, 1.0, hi_open=True)
        if self.gqa is not None:
            one_of(self.gqa, "gqa", GQA_MODES)
            require(self.prune_heads, "gqa", "prunes attention heads: needs prune_heads: true")
        if self.head_ratio is not None:
            in_range(self.head_ratio, "head_ratio", 0.0, 1.0, hi_open=True)
        require(isinstance(self.ratios, dict), "ratios", "must map layer-name patterns to ratios")
        for pattern, value in self.ratios.items():
            require(isinstance(pattern, str) and pattern != "", "ratios", "keys must be non-empty patterns")
            in_range(value, f"ratios.{pattern}", 0.0, 1.0, hi_open=True)
        importance_class(self.importance)  # the registry is the one list of criteria
        positive_int(self.min_width, "min_width")
        positive_int(self.min_heads, "min_heads")
        positive_int(self.round_to, "round_to")
        positive_int(self.calibration_batches, "calibration_batches")
        _check_patterns(self.include, "include")
        _check_patterns(self.exclude, "exclude")
        require(isinstance(self.seed, int), "seed", "must be an integer")

    @property
    def effective_head_ratio(self) -> float:
        return self.ratio if self.head_ratio is None else self.head_ratio

    @property
    def needs_calibration(self) -> bool:
        return importance_class(self.importance).needs_calibration


GQA_MODES = ("groups", "heads")
DEPTH_IMPORTANCES = ("angular", "perplexity")


@dataclass
class DepthConfig:
    """Depth pruning: drop whole decoder blocks, the least important first (:mod:`slimkit.prune.depth`).

    Exactly one of ``blocks`` (how many to drop), ``ratio`` (the fraction of the blocks, rounded
    down) and ``indices`` (which ones, counted from 0: no ranking, as a searched or earlier run
    chose them). ``importance``: ``angular``, ShortGPT's block influence, 1 - cos(h_in, h_out) averaged
    over the calibration tokens (a block that barely turns the hidden state goes first); or
    ``perplexity``, the increase of the calibration loss when that block alone is skipped.
    """

    blocks: int | None = None
    ratio: float | None = None
    indices: list[int] | None = None
    importance: str = "angular"
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        given = [n for n in ("blocks", "ratio", "indices") if getattr(self, n) is not None]
        require(
            len(given) == 1, "blocks", f"set exactly one of blocks, ratio, indices (got {given or 'none'})"
        )
        if self.indices is not None:
            require(
                isinstance(self.indices, list)
                and bool(self.indices)
                and all(type(i) is int and i >= 0 for i in self.indices)
                and len(set(self.indices)) == len(self.indices),
                "indices",
                f"must be a non-empty list of distinct block numbers >= 0, got {self.indices!r}",
            )
        if self.blocks is not None:
            positive_int(self.blocks, "blocks")
        if self.ratio is not None:
            in_range(self.ratio, "ratio", 0.0, 1.0, hi_open=True)
        one_of(self.importance, "importance", DEPTH_IMPORTANCES)
        positive_int(self.calibration_batches, "calibration_batches")

    def dropped(self, blocks: int) -> int:
        """How many of ``blocks`` blocks go."""
        if self.indices is not None:
            return len(self.indices)
        return self.blocks if self.blocks is not None else int(self.ratio * blocks + 1e-9)
