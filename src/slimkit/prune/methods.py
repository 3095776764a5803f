"""The table of prune methods: ``{config type: handler}``; ``prune_`` dispatches through it.

A handler is ``handler(model, config, **kwargs) -> PruneSummary``. Adding a
method is one module with its config, its handler decorated with
:func:`register_method`, and an import of that module in :mod:`slimkit.prune.api`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slimkit.prune.summary import PruneSummary

Handler = Callable[..., PruneSummary]

PRUNE_METHODS: dict[type, Handler] = {}


def register_method(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``@register_method(MagnitudeConfig) def prune_magnitude(model, config): ...``."""

    def register(handler: Handler) -> Handler:
        if config_type in PRUNE_METHODS:
            raise ValueError(
                f"a prune method for {config_type.__name__} is already registered "
                f"({PRUNE_METHODS[config_type].__name__})"
            )
        PRUNE_METHODS[config_type] = handler
        return handler

    return register


def handler_for(config: Any) -> Handler:
    """The handler registered for ``config``'s type (or a base class of it)."""
    for cls in type(config).__mro__:
        if cls in PRUNE_METHODS:
            return PRUNE_METHODS[cls]
    known = ", ".join(t.__name__ for t in PRUNE_METHODS)
    raise TypeError(f"prune_ needs one of {known}, got {type(config).__name__}")


def no_extra_arguments(method: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{method} pruning takes no extra arguments, got {sorted(kwargs)}")
