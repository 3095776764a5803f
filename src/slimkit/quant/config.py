"""Quantization configs: one typed dataclass per method, validated on construction.

Every config selects layers by module-name pattern (``include``, fnmatch) and
may override single layers: ``overrides={"encoder.layer.5.*": None}`` keeps
those layers in float, ``overrides={"classifier": WeightOnlyConfig(bits=8)}``
gives them another method. The first matching pattern wins. A recipe writes
the same thing as plain data with a ``method`` key (see :func:`config_from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimkit.config import from_dict, in_range, non_negative, one_of, positive, positive_int, require
from slimkit.errors import ConfigError
from slimkit.quant.observers import OBSERVERS

WEIGHT_OBSERVERS = ("minmax", "mse")


@dataclass
class _Common:
    include: list[str] = field(default_factory=lambda: ["*"])
    overrides: dict[str, Any] = field(default_factory=dict)
    quantize_embeddings: bool = False  # int8 weight-only embedding tables (a large share of a small BERT)

    def __post_init__(self):
        require(
            isinstance(self.include, list) and self.include, "include", "must be a non-empty list of patterns"
        )
        for i, pattern in enumerate(self.include):
            require(isinstance(pattern, str) and pattern, f"include[{i}]", "must be a non-empty string")
        require(isinstance(self.overrides, dict), "overrides", "must be a mapping pattern -> config or null")
        parsed = {}
        for pattern, value in self.overrides.items():
            require(
                isinstance(pattern, str) and pattern, "overrides", f"pattern {pattern!r} must be a string"
            )
            if isinstance(value, dict):
                value = {"method": self.method, **value}
                try:
                    value = config_from_dict(value)
                except ConfigError as err:
                    raise err.prefixed(f"overrides.{pattern}") from None
            require(
                value is None or isinstance(value, LAYER_CONFIGS),
                f"overrides.{pattern}",
                "must be a quantization config or null (keep in float)",
            )
            parsed[pattern] = value
        self.overrides = parsed

    @property
    def method(self) -> str:
        return METHOD_NAMES[type(self)]

    @property
    def needs_calibration(self) -> bool:
        return False


@dataclass
class Int8DynamicConfig(_Common):
    """int8 weights (per output channel) and int8 activations with scales computed at run time.

    ``activation_granularity``: ``token`` (one scale per row: most accurate) or
    ``tensor`` (one scale per call: what ONNX Runtime's kernels do).
    """

    weight_observer: str = "minmax"
    activation_granularity: str = "token"
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        one_of(self.weight_observer, "weight_observer", WEIGHT_OBSERVERS)
        one_of(self.activation_granularity, "activation_granularity", ("token", "tensor"))
        in_range(self.smoothquant_alpha, "smoothquant_alpha", 0.0, 1.0)

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant


@dataclass
class Int8StaticConfig(_Common):
    """int8 weights and activations; activation ranges fixed by calibration on data.

    ``fold_batchnorm``: a Conv2d read only by a BatchNorm2d takes the BatchNorm's
    affine map into its weights before they are quantized (the BatchNorm becomes
    an identity), found on a traced forward pass of the first calibration batch.
    """

    activation_observer: str = "minmax"
    activation_symmetric: bool = False
    percentile: float = 99.99
    weight_observer: str = "minmax"
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5
    fold_batchnorm: bool = True

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.fold_batchnorm, bool), "fold_batchnorm", "must be true or false")
        one_of(self.activation_observer, "activation_observer", OBSERVERS)
        one_of(self.weight_observer, "weight_observer", WEIGHT_OBSERVERS)
        in_range(self.percentile, "percentile", 50.0, 100.0)
        in_range(self.smoothquant_alpha, "smoothquant_alpha", 0.0, 1.0)

    @property
    def needs_calibration(self) -> bool:
        return True


@dataclass
class WeightOnlyConfig(_Common):
    """Weights in ``bits`` (8: per channel; 4: per group), activations stay float.

    ``group_size``: 32, 64 or 128 for 4 bits (null means 128); null for 8 bits.

    ``method``: ``rtn`` (round to nearest) or ``gptq`` (Hessian-based error
    compensation on calibration data, Frantar et al. 2022).
    """

    bits: int = 4
    group_size: int | None = None
    algorithm: str = "rtn"
    symmetric: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        one_of(self.bits, "bits", (4, 8))
        one_of(self.algorithm, "algorithm", ("rtn", "gptq"))
        non_negative(self.damp, "damp")
        positive_int(self.block_size, "block_size")
        if self.bits == 4:
            self.group_size = 128 if self.group_size is None else self.group_size
            one_of(self.group_size, "group_size", (32, 64, 128))
        else:
            # The int8 weight-only kernel (aten._weight_int8pack_mm) takes one scale per output channel.
            require(self.group_size is None, "group_size", "must be null for 8 bits (per-channel scales)")
            require(
                self.symmetric, "symmetric", "8-bit weight-only is symmetric (the kernel takes no zero point)"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm == "gptq"


@dataclass
class QATConfig(_Common):
    """Quantization-aware training: fake-quantized weights (and activations) while training."""

    weight_bits: int = 8
    activation_bits: int | None = 8
    weight_granularity: str = "channel"
    activation_observer: str = "moving_average"
    momentum: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        one_of(self.weight_bits, "weight_bits", (4, 8))
        require(self.activation_bits in (None, 8), "activation_bits", "must be 8 or null (float activations)")
        one_of(self.weight_granularity, "weight_granularity", ("tensor", "channel"))
        one_of(self.activation_observer, "activation_observer", ("minmax", "moving_average"))
        in_range(self.momentum, "momentum", 0.0, 1.0)


@dataclass
class BF16Config(_Common):
    """bfloat16 weights and compute for the selected layers (not an integer format)."""


@dataclass
class MixedPrecisionConfig(_Common):
    """Quantize every layer with ``low`` except the most sensitive ones, kept in ``high`` (null: float).

    Sensitivity: the output error on calibration data when one layer alone is
    quantized. Budgets: ``max_error`` (relative output MSE), ``max_size_mb``
    (estimated weight size), ``max_high_layers`` (a cap on kept layers).
    """

    low: Any = field(default_factory=lambda: {"method": "int8_dynamic"})
    high: Any = None
    max_error: float | None = None
    max_size_mb: float | None = None
    max_high_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.low = _sub_config(self.low, "low")
        self.high = None if self.high is None else _sub_config(self.high, "high")
        require(self.low is not None, "low", "is required")
        # Calibration statistics are collected for ``low`` only; ``high`` must not need any.
        require(
            self.high is None or not self.high.needs_calibration,
            "high",
            "must be null (float) or a method without calibration (bf16, int8_dynamic, weight_only rtn)",
        )
        budgets = (self.max_error, self.max_size_mb, self.max_high_layers)
        require(
            any(b is not None for b in budgets),
            "max_error",
            "set at least one budget: max_error, max_size_mb or max_high_layers",
        )
        if self.max_error is not None:
            positive(self.max_error, "max_error")
        if self.max_size_mb is not None:
            positive(self.max_size_mb, "max_size_mb")
        if self.max_high_layers is not None:
            require(
                isinstance(self.max_high_layers, int) and self.max_high_layers >= 0,
                "max_high_layers",
                "must be an integer >= 0",
            )

    @property
    def needs_calibration(self) -> bool:
        return True


def _sub_config(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        try:
            value = config_from_dict(value)
        except ConfigError as err:
            raise err.prefixed(name) from None
    require(isinstance(value, LAYER_CONFIGS), name, "must be a layer quantization config")
    return value


METHODS: dict[str, type] = {
    "int8_dynamic": Int8DynamicConfig,
    "int8_static": Int8StaticConfig,
    "weight_only": WeightOnlyConfig,
    "qat": QATConfig,
    "bf16": BF16Config,
    "mixed": MixedPrecisionConfig,
}
METHOD_NAMES = {cls: name for name, cls in METHODS.items()}
LAYER_CONFIGS = (Int8DynamicConfig, Int8StaticConfig, WeightOnlyConfig, QATConfig, BF16Config)
QuantConfig = (*LAYER_CONFIGS, MixedPrecisionConfig)


def config_from_dict(data: Any, path: str = "") -> Any:
    """Build a config from ``{"method": "int8_static", ...}`` (the recipe form)."""
    if dataclasses.is_dataclass(data) and isinstance(data, QuantConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping with a 'method' key, got {type(data).__name__}")
    method = data.get("method")
    prefix = f"{path}.method" if path else "method"
    if method not in METHODS:
        raise ConfigError(prefix, f"must be one of {', '.join(METHODS)}; got {method!r}")
    rest = {k: v for k, v in data.items() if k != "method"}
    return from_dict(METHODS[method], rest, path)
