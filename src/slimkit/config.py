"""Typed configuration dataclasses, validated on construction.

Every config in slimkit is a dataclass whose ``__post_init__`` checks its
values and raises :class:`ConfigError` naming the field. ``from_dict`` builds
one from plain data (a YAML recipe), checking unknown keys and types first, so
that a recipe error reads ``steps[2].epochs: must be a positive integer``.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from slimkit.errors import ConfigError

T = TypeVar("T")
MAX_REPR = 200  # characters of a value shown in a message: a 200k-element list must not flood stderr


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without building the whole repr of a huge value."""
    brief = reprlib.Repr()
    brief.maxlist = brief.maxtuple = brief.maxset = brief.maxdict = 10
    brief.maxstring = brief.maxother = limit
    brief.maxlevel = 4
    text = brief.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)


def positive_int(value: Any, field: str) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field,
        "must be a positive integer",
    )


def non_negative(value: Any, field: str) -> None:
    require(_is_number(value) and value >= 0, field, f"must be >= 0{_finite(value)}, got {short_repr(value)}")


def positive(value: Any, field: str) -> None:
    require(_is_number(value) and value > 0, field, f"must be > 0{_finite(value)}, got {short_repr(value)}")


def in_range(value: Any, field: str, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = _is_number(value) and lo <= value and (value < hi if hi_open else value <= hi)
    bounds = f"[{lo}, {hi}{')' if hi_open else ']'}"
    require(ok, field, f"must be in {bounds}{_finite(value)}, got {short_repr(value)}")


def one_of(value: Any, field: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    require(
        value in choices, field, f"must be one of {', '.join(map(str, choices))}; got {short_repr(value)}"
    )


def _is_number(value: Any) -> bool:
    """A real, finite number: NaN and infinities are refused (a NaN lr trains silently to NaN weights)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _finite(value: Any) -> str:
    """What to add to a message about a NaN or an infinity (their comparisons say nothing useful)."""
    return " and finite" if isinstance(value, float) and not math.isfinite(value) else ""


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, reporting errors with their path."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            _join(path, short_key(unknown[0])), f"unknown key (expected one of: {', '.join(fields)})"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.prefixed(path) from None


def convert(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``hint`` (recursing into lists, dicts, dataclasses)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return convert(option, value, path)
            except ConfigError as err:
                errors.append(err)
        raise (
            errors[-1] if len(errors) == 1 else ConfigError(path, f"has the wrong type ({short_repr(value)})")
        )
    if origin is Literal:
        one_of(value, path, get_args(hint))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {type(value).__name__}")
        (item,) = get_args(hint)[:1] or (Any,)
        out = [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
        _, vtype = get_args(hint) or (Any, Any)
        return {k: convert(vtype, v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        require(isinstance(value, bool), path, f"must be true or false, got {short_repr(value)}")
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        require(ok, path, f"must be an integer, got {short_repr(value)}")
    elif hint is float:
        require(
            _is_number(value),
            path,
            f"must be a{_finite(value) and ' finite'} number, got {short_repr(value)}",
        )
        return float(value)
    elif hint is str:
        require(isinstance(value, str), path, f"must be a string, got {short_repr(value)}")
    return value


def to_dict(config: Any) -> Any:
    """Plain-data view of a config (for the resolved recipe and reports)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def short_key(key: Any) -> str:
    """A mapping key as it appears in a field path, cut like a value (a key can be any YAML scalar)."""
    text = str(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
