"""mixed: quantize every layer with ``low`` except the most sensitive ones, kept in ``high`` (or float).

A policy over other methods: its layers get ``low`` (or ``high``) configs, so
collecting and building are those methods'; what is its own is keeping the
calibration batches and choosing the layers at ``convert_``
(:func:`slimkit.quant.sensitivity.mixed_precision_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimkit.config import positive, require
from slimkit.quant.base import QuantConfig, sub_config
from slimkit.quant.method import QuantMethod, onnx_problem, register_method
from slimkit.quant.sensitivity import mixed_precision_plan


@dataclass
class MixedPrecisionConfig(QuantConfig):
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
        self.low = sub_config(self.low, "low")
        self.high = None if self.high is None else sub_config(self.high, "high")
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


class Mixed(QuantMethod):
    name = "mixed"
    config_type = MixedPrecisionConfig
    per_layer = False
    keeps_batches = True

    def layer_config(self, config: MixedPrecisionConfig) -> Any:
        return config.low

    def refine_plan(self, config: MixedPrecisionConfig, model: nn.Module, state: Any) -> Any:
        return mixed_precision_plan(model, config, state)

    def onnx_problem(self, config: MixedPrecisionConfig) -> tuple[str, str] | None:
        for key in ("low", "high"):  # both parsed into configs in __post_init__
            part = getattr(config, key)
            if part is not None and (found := onnx_problem(part)):
                return f"{key}.{found[0]}", found[1]
        return None


METHOD = register_method(Mixed())
