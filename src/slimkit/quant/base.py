"""What every method's config shares: layer selection by pattern, per-layer overrides, the recipe form.

Every config selects layers by module-name pattern (``include``, fnmatch) and
may override single layers: ``overrides={"encoder.layer.5.*": None}`` keeps
those layers in float, ``overrides={"classifier": WeightOnlyConfig(bits=8)}``
gives them another method. The first matching pattern wins. A recipe writes
the same thing as plain data with a ``method`` key (see :func:`config_from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimkit.calibration.held import check_block_fields
from slimkit.config import from_dict, require
from slimkit.errors import ConfigError
from slimkit.quant.method import is_layer_config, is_quant_config, method_for, method_named, method_names

WEIGHT_OBSERVERS = ("minmax", "mse")


@dataclass
class QuantConfig:
    """Base of every method's config dataclass."""

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
        self.overrides = {
            pattern: self._override(pattern, value) for pattern, value in self.overrides.items()
        }

    def _override(self, pattern: Any, value: Any) -> Any:
        require(isinstance(pattern, str) and pattern, "overrides", f"pattern {pattern!r} must be a string")
        if isinstance(value, dict):
            try:
                value = config_from_dict({"method": self.method, **value})
            except ConfigError as err:
                raise err.prefixed(f"overrides.{pattern}") from None
        require(
            value is None or is_layer_config(value),
            f"overrides.{pattern}",
            "must be a quantization config or null (keep in float)",
        )
        return value

    @property
    def method(self) -> str:
        return method_for(self).name

    @property
    def needs_calibration(self) -> bool:
        return False


@dataclass
class BlockCalibration(QuantConfig):
    """Fields of the methods that can calibrate a stack of repeated blocks one block at a time.

    ``sequential``: block by block (null: on for causal LMs, whose logits are
    then never made). ``micro_batch``: run the blocks on at most this many
    calibration samples at a time (the same result as giving batches that
    small; bounds the activations of one block pass). ``hold_inputs``: where
    the current block's inputs are kept between passes: ``memory`` (float, as
    computed), ``bfloat16`` (half the bytes; rounded) or ``disk`` (a temporary
    folder, read back one batch at a time; same numbers, least memory).
    """

    sequential: bool | None = None
    micro_batch: int | None = None
    hold_inputs: str = "memory"

    def __post_init__(self):
        super().__post_init__()
        check_block_fields(self)


def sub_config(value: Any, name: str) -> Any:
    """A layer config given as a config or its recipe form (a part of another config, e.g. ``low``)."""
    if isinstance(value, dict):
        try:
            value = config_from_dict(value)
        except ConfigError as err:
            raise err.prefixed(name) from None
    require(is_layer_config(value), name, "must be a layer quantization config")
    return value


def config_from_dict(data: Any, path: str = "") -> Any:
    """Build a config from ``{"method": "int8_static", ...}`` (the recipe form)."""
    if is_quant_config(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping with a 'method' key, got {type(data).__name__}")
    method = data.get("method")
    if method not in method_names():
        raise ConfigError(
            f"{path}.method" if path else "method",
            f"must be one of {', '.join(method_names())}; got {method!r}",
        )
    rest = {k: v for k, v in data.items() if k != "method"}
    return from_dict(method_named(method).config_type, rest, path)


def as_config(config: Any) -> Any:
    """A config object from a config or its recipe form; anything else is refused."""
    if isinstance(config, dict):
        return config_from_dict(config)
    if not is_quant_config(config):
        raise ConfigError(
            "config", f"must be a quantization config or a mapping, got {type(config).__name__}"
        )
    return config
