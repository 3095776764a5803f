"""The configs of the built-in quantization methods, and the recipe form ``{"method": name, ...}``.

Each config is defined in its method's file (``slimkit/quant/methods/``);
they are gathered here for importing. :data:`METHODS` is a read-only view of
the method table, ``{name: config class}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from slimkit.quant.base import WEIGHT_OBSERVERS, QuantConfig, as_config, config_from_dict
from slimkit.quant.method import method_named, method_names
from slimkit.quant.methods import (
    AWQConfig,
    BF16Config,
    CodebookConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    MixedPrecisionConfig,
    QATConfig,
    WeightOnlyConfig,
)


class _MethodConfigs(Mapping):
    """``{method name: config class}``, read live from the method table."""

    def __getitem__(self, name: str) -> type:
        if name not in method_names():
            raise KeyError(name)
        return method_named(name).config_type

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())


METHODS: Mapping[str, type] = _MethodConfigs()

__all__ = [
    "METHODS",
    "WEIGHT_OBSERVERS",
    "AWQConfig",
    "BF16Config",
    "CodebookConfig",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "MixedPrecisionConfig",
    "QATConfig",
    "QuantConfig",
    "WeightOnlyConfig",
    "as_config",
    "config_from_dict",
]
