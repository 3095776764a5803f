"""Other libraries' console output during a run: off under ``--quiet``, bars off when not on a terminal.

Hugging Face's libraries draw their own progress bars (``Loading weights``,
dataset shards) and log warnings through their own loggers. A library already
imported is silenced on entry to :func:`quiet_libraries`, and one imported later
by :func:`hush_imported`, which slimkit calls right after importing it; nothing
here imports them, and everything is put back on exit. torchao, which
transformers imports whenever it is installed, is imported once by
:func:`hush_import_noise` with its import-time noise off.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Restore = Callable[[], None]


class _State:
    active = False  # inside quiet_libraries()
    bars = True  # third-party progress bars allowed
    logs = True  # third-party log lines allowed
    restore: dict[str, Restore] = {}  # library -> how to put it back


_state = _State()


class _DropEnumConstantNotice(logging.Filter):
    """PyTorch's notice to library authors that Enums need no ``register_constant``: torchao's
    submodules trigger it as transformers imports them, long after :func:`hush_import_noise`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


_ENUM_NOTICE = _DropEnumConstantNotice()


def hush_import_noise() -> None:
    """Import torchao now, without its import-time log lines and warnings, if it is installed.

    transformers imports torchao (for its quantizer registry) whenever it is installed, as
    soon as a model class loads; torchao then logs ``Failed to load ... .so`` for each CUDA
    extension a CPU build of PyTorch cannot load, and PyTorch warns about torchao's enum
    registrations: lines that say nothing about slimkit's work. Call before transformers.
    """
    pytree_log = logging.getLogger("torch.utils._pytree")
    if _ENUM_NOTICE not in pytree_log.filters:
        pytree_log.addFilter(_ENUM_NOTICE)
    if "torchao" in sys.modules or importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)  # its child loggers (torchao.kernel...) inherit it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("torchao")
    except Exception:  # a broken torchao: transformers reports it when it imports it
        pass
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _hub(bars: bool, logs: bool) -> Restore | None:
    from huggingface_hub import utils as hub

    if bars or hub.are_progress_bars_disabled():
        return None
    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=0 wins, with a warning
        warnings.simplefilter("ignore")
        hub.disable_progress_bars()
    return hub.enable_progress_bars


def _hf_library(name: str) -> Callable[[bool, bool], Restore | None]:
    """transformers and datasets share one API: ``<name>.utils.logging`` bars and verbosity."""

    def silence(bars: bool, logs: bool) -> Restore | None:
        hf = importlib.import_module(f"{name}.utils.logging")  # the package itself is imported already
        was_bars, was_level = hf.is_progress_bar_enabled(), hf.get_verbosity()
        if not bars:
            hf.disable_progress_bar()
        if not logs:
            hf.set_verbosity_error()

        def restore() -> None:
            if was_bars and not bars:
                hf.enable_progress_bar()
            hf.set_verbosity(was_level)

        return restore

    return silence


# Applied in this order, undone in reverse (transformers' switch also flips the hub's, which is undone last).
_LIBRARIES: dict[str, Callable[[bool, bool], Restore | None]] = {
    "huggingface_hub": _hub,
    "transformers": _hf_library("transformers"),
    "datasets": _hf_library("datasets"),
}


def hush_imported() -> None:
    """Apply the current :func:`quiet_libraries` settings to libraries imported since it started."""
    if not _state.active or (_state.bars and _state.logs):
        return
    for name, silence in _LIBRARIES.items():
        if name in sys.modules and name not in _state.restore:
            restore = silence(_state.bars, _state.logs)
            if restore is not None:
                _state.restore[name] = restore


@contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """Third-party bars and log lines off when ``quiet``; bars also off when stderr is not a terminal.

    A bar redrawn many times a second is one line on a terminal but thousands of
    lines in a log file, so without a terminal only slimkit's per-epoch lines remain.
    """
    if _state.active:  # nested (a run inside a run): the outer settings stay
        yield
        return
    _state.active, _state.bars, _state.logs = True, not quiet and _isatty(sys.stderr), not quiet
    _state.restore = {}
    try:
        hush_imported()
        yield
    finally:
        restores = list(_state.restore.values())
        _state.active, _state.bars, _state.logs, _state.restore = False, True, True, {}
        for restore in reversed(restores):
            restore()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
