"""The user's own model factory (``package.module:function``): which modules may be named, and calling it safely.

A factory imports and runs code, so a recipe naming one is a program, not a
settings file. The recipe layer asks for consent (``trust_code: true`` or
``--trust-code``) before anything here imports the module; this module adds
the limits that hold even with consent: never a module of the standard
library or another module whose functions run commands, load pickles or
execute strings (``os:system``, ``subprocess:check_output``,
``builtins:exec``, ``torch:load``), and the function must be defined in the
module named (or a submodule of it), so a user module that re-exports
``os.system`` does not pass either.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

from slimkit.config import short_repr
from slimkit.errors import ConfigError, ModelError

# Beyond the standard library: modules that run commands, unpickle, execute strings or fetch code.
DENIED = frozenset(
    {
        "torch.serialization",
        "torch.hub",
        "torch.jit",
        "torch.package",
        "torch.utils.cpp_extension",
        "numpy",
        "pandas",
        "joblib",
        "dill",
        "cloudpickle",
        "yaml",
        "IPython",
        "setuptools",
        "pip",
        "pytest",
        "_pytest",
        "sh",
        "pexpect",
        "fabric",
        "invoke",
        "paramiko",
    }
)
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def factory_parts(spec: Any) -> tuple[str, str]:
    """``("package.module", "function")`` from ``"package.module:function"``, or a ConfigError on ``factory``."""
    if not isinstance(spec, str):
        raise ConfigError("factory", f"must be a string package.module:function, got {short_repr(spec)}")
    module, sep, attr = spec.partition(":")
    if not (sep and _DOTTED.match(module) and _NAME.match(attr)):
        raise ConfigError("factory", f"must look like package.module:function, got {short_repr(spec)}")
    return module, attr


def module_problem(module: str) -> str | None:
    """Why ``module`` may never provide a factory (even with consent), or None."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return f"{module} is part of Python's standard library, not a model factory"
    denied = next((d for d in DENIED if module == d or module.startswith(d + ".")), None)
    if denied is not None:
        return f"{module} can run commands or load pickles; it cannot be a model factory"
    return None


def check_factory_name(spec: Any) -> str:
    """The module a factory imports (checked without importing anything); ConfigError on ``factory``."""
    module, _ = factory_parts(spec)
    problem = module_problem(module)
    if problem:
        raise ConfigError("factory", problem)
    return module


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import the module and return the function, defined there, that ``spec`` names (not called)."""
    module_name, attr = factory_parts(spec)
    problem = module_problem(module_name)
    if problem:
        raise ModelError(f"factory: {problem}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"factory: cannot import {module_name!r} ({short_repr(str(err))})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError(f"factory: {module_name} has no callable {attr!r}")
    defined = getattr(fn, "__module__", None)
    if not isinstance(defined, str) or not (defined == module_name or defined.startswith(module_name + ".")):
        raise ModelError(
            f"factory: {module_name}.{attr} is defined in {defined or 'no module'}, not in {module_name}; "
            "name the module that defines the function"
        )
    problem = module_problem(defined)
    if problem:
        raise ModelError(f"factory: {problem}")
    return fn


def kwargs_problem(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, why)`` when ``fn(**kwargs)`` cannot bind (an unknown or a missing argument), else None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a C function): the call will tell
        return None
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in named]
    if unknown and not takes_any:
        return f"kwargs.{unknown[0]}", f"{_name(fn)} takes {', '.join(named) or 'no arguments'}"
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs
    ]
    if missing:
        return f"kwargs.{missing[0]}", f"is required by {_name(fn)}"
    return None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
