"""Choosing layers by module type and name pattern (never by attribute path)."""

from __future__ import annotations

import fnmatch

from torch import nn

from slimkit.errors import ConfigError


def matches(name: str, pattern: str) -> bool:
    """fnmatch on the dotted module name; a bare name also matches as a suffix (``fc1`` ~ ``net.fc1``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def select_modules(
    model: nn.Module,
    include: list[str],
    exclude: list[str],
    module_types: list[str],
    field_prefix: str = "",
) -> dict[str, nn.Module]:
    """Modules of the given type names matching an include and no exclude pattern.

    Every pattern must match at least one module of the model (any type), so a
    typo is an error naming the field, not a silent no-op.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    for field_name, patterns in (("include", include), ("exclude", exclude)):
        for i, pattern in enumerate(patterns):
            if not any(matches(n, pattern) for n, _ in named):
                raise ConfigError(f"{field_prefix}{field_name}[{i}]", f"pattern {pattern!r} matches no layer")
    chosen = {
        n: m
        for n, m in named
        if type(m).__name__ in module_types
        and any(matches(n, p) for p in include)
        and not any(matches(n, p) for p in exclude)
    }
    if not chosen:
        raise ConfigError(
            f"{field_prefix}include",
            f"no layer of type {', '.join(module_types)} matches {include} (minus exclusions {exclude})",
        )
    return chosen
