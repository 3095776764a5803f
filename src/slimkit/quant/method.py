"""The quantization method table: one :class:`QuantMethod` per config type.

Everything that differs between methods (which layers a method takes, what it
collects during calibration, how it builds the quantized layer, whether ONNX
Runtime can run the result, how its layers are saved) lives in the method's
own file, ``slimkit/quant/methods/<name>.py``, as a subclass of
:class:`QuantMethod` registered with :func:`register_method`. The entry points
(``quantize_``, planning, ``onnx_problem``, save/load, ``config_from_dict``)
look methods up here and never test a config's class. Adding a method is one
new file: its config dataclass (a :class:`~slimkit.quant.base.QuantConfig`),
its ``QuantMethod`` and the ``register_method`` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from slimkit.errors import ConfigError
from slimkit.quant.codecs import BASE_CODECS, LayerCodec


class QuantMethod:
    """One quantization method. Subclasses set the class attributes and override what differs.

    ``per_layer`` is False for a policy that hands layers to other methods
    (mixed precision): such a method is never a layer's config itself, so it
    cannot be an override or a part of another config.
    """

    name: str = ""  # the ``method`` key of the recipe form, e.g. "int8_static"
    config_type: type | None = None  # its config dataclass (a QuantConfig)
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,)  # float modules it quantizes
    codecs: tuple[LayerCodec, ...] = ()  # how the layers it builds are saved and rebuilt
    per_layer: bool = True
    trains: bool = False  # quantize_ only prepares; the model is trained, then convert_ builds the layers
    takes_folded_conv: bool = False  # a conv may take its BatchNorm's affine map before it is built
    keeps_batches: bool = False  # calibrate keeps the batches (for an analysis at convert_)

    def layer_config(self, config: Any) -> Any:
        """The config that the layers selected by ``include`` get (mixed precision: its ``low``)."""
        return config

    def supports(self, config: Any, module: nn.Module) -> str | None:
        """``None`` if this method can quantize ``module``, else the reason it cannot (kept float)."""
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.Conv2d):
            if nn.Conv2d not in self.layer_types:
                return f"{self.name} handles Linear layers only"
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                return "only groups=1, zero-padded convolutions with numeric padding are quantized"
            return None
        return "not a Linear or Conv2d"

    def collectors(self, config: Any, module: nn.Module) -> dict[str, Any]:
        """Calibration collectors for ``module``: objects with ``update(x)`` fed the layer's input."""
        return {}

    def prepare_layer(self, config: Any, module: nn.Module) -> nn.Module | None:
        """The module put in ``module``'s place by ``prepare_`` (QAT: a fake-quantized one), or None."""
        return None

    def unprepare_layer(self, config: Any, module: nn.Module) -> nn.Module | None:
        """The float module that undoes :meth:`prepare_layer`, or None if nothing was swapped."""
        return None

    def build(self, config: Any, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        """The quantized replacement of ``module`` (float, or what ``prepare_layer`` put there)."""
        raise NotImplementedError(f"{self.name} builds no layer of its own")

    def fold_batchnorm(self, config: Any) -> bool:
        """Whether ``convert_`` folds BatchNorms into the convs before they are built."""
        return False

    def refine_plan(self, config: Any, model: nn.Module, state: Any) -> Any:
        """The final plan at ``convert_``; ``state`` holds ``plan``, ``collectors``, ``batches``, ``forward``."""
        return state.plan

    def calibrates_by_block(self, config: Any, model: nn.Module) -> bool:
        """Whether ``quantize_`` calibrates ``model`` one block at a time (``slimkit.quant.sequential``)."""
        return False

    def true_sequential(self, config: Any) -> bool:
        """With block-by-block calibration: whether a block's layers are calibrated stage by stage."""
        return False

    def weight_bytes(self, config: Any, module: nn.Module) -> float:
        """Estimated bytes of ``module``'s weight once quantized (codes and scales)."""
        return module.weight.numel() + 4.0 * module.weight.shape[0]

    def onnx_problem(self, config: Any) -> tuple[str, str] | None:
        """``(field, why)`` if the layers ``config`` makes (overrides aside) have no ONNX Runtime form."""
        return None


_BY_NAME: dict[str, QuantMethod] = {}
_BY_TYPE: dict[type, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    """Add ``method`` to the table; a second method with the same name, config type or codec is refused."""
    if not isinstance(method.name, str) or not method.name:
        raise ValueError(f"{type(method).__name__}.name must be a non-empty string")
    if not (isinstance(method.config_type, type) and dataclasses.is_dataclass(method.config_type)):
        raise ValueError(f"{type(method).__name__}.config_type must be a config dataclass")
    if method.name in _BY_NAME:
        raise ValueError(f"quantization method {method.name!r} is already registered")
    if method.config_type in _BY_TYPE:
        owner = _BY_TYPE[method.config_type].name
        raise ValueError(f"{method.config_type.__name__} is already the config of method {owner!r}")
    known = {codec.name: codec for codec in layer_codecs()}
    for codec in method.codecs:
        if known.get(codec.name, codec) is not codec:  # a shared codec object is fine, a rival is not
            raise ValueError(f"{method.name}: another codec is registered for layer class {codec.name}")
    _BY_NAME[method.name] = method
    _BY_TYPE[method.config_type] = method
    return method


def unregister_method(name: str) -> QuantMethod:
    """Remove a method from the table (for tests and plugins); returns it."""
    method = _BY_NAME.pop(name)
    del _BY_TYPE[method.config_type]
    return method


@contextmanager
def registered(method: QuantMethod) -> Iterator[QuantMethod]:
    """``with registered(MyMethod()):`` the method is in the table inside the block only."""
    register_method(method)
    try:
        yield method
    finally:
        unregister_method(method.name)


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_BY_NAME)


def method_named(name: str) -> QuantMethod:
    if name not in _BY_NAME:
        raise ConfigError("method", f"must be one of {', '.join(_BY_NAME)}; got {name!r}")
    return _BY_NAME[name]


def find_method(config: Any) -> QuantMethod | None:
    """The method whose config type ``config`` is (or derives from), None if it is not a config."""
    return next((_BY_TYPE[cls] for cls in type(config).__mro__ if cls in _BY_TYPE), None)


def method_for(config: Any) -> QuantMethod:
    method = find_method(config)
    if method is None:
        raise ConfigError(
            "config", f"{type(config).__name__} is not the config of a registered quantization method"
        )
    return method


def is_quant_config(value: Any) -> bool:
    return find_method(value) is not None


def is_layer_config(value: Any) -> bool:
    """A config that a layer can be given (every method's config but a policy's, like mixed)."""
    method = find_method(value)
    return method is not None and method.per_layer


def layer_codecs() -> list[LayerCodec]:
    """Every layer class's codec: the shared ones, then each registered method's."""
    out = {codec.name: codec for codec in BASE_CODECS}
    for method in _BY_NAME.values():
        out.update({codec.name: codec for codec in method.codecs})
    return list(out.values())


def onnx_problem(config: Any) -> tuple[str, str] | None:
    """``(field path, why)`` if layers quantized by ``config`` could have no ONNX Runtime form, else None.

    The field path is relative to the config: ``activation_granularity``,
    ``low.method`` (mixed precision), ``overrides.<pattern>.method``.
    """
    found = method_for(config).onnx_problem(config)
    if found is not None:
        return found
    for pattern, override in config.overrides.items():
        if override is not None and (found := onnx_problem(override)):
            return f"overrides.{pattern}.{found[0]}", found[1]
    return None


def no_runtime_form(config: Any) -> tuple[str, str]:
    """The ``onnx_problem`` of a method whose layers ONNX Runtime cannot run at all."""
    return (
        "method",
        f"{config.method} layers have no ONNX Runtime form; use int8_dynamic, int8_static or weight_only",
    )
