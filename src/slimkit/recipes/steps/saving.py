"""What a run keeps so that ``slimkit run RECIPE --resume`` can go on after an interruption.

Two things, both written by the runner into the run's resumable state
(:mod:`slimkit.recipes.resume`):

- each finished step's model, written by the saver in effect after the step
  (sparse, pruned, quantized, ONNX). A saver is paired here with the loader
  that reads its files back (:func:`register_format`); a step type rebuilds
  the model that such a file loads into with its ``restore`` hook
  (see :func:`slimkit.recipes.steps.base.register_step`);
- the trainer checkpoints of the step that is running: ``ctx.train`` writes one
  at the end of every epoch into the folder :class:`StepCheckpoints` gives it,
  and resumes from it when the step runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from slimkit.train import Callback
from slimkit.utils.io import load_weights, save_weights

Saver = Callable[[nn.Module, Path], int]  # writes the model to a path, returns the file's size in bytes
Loader = Callable[[nn.Module, Path], nn.Module]  # fills (or rebuilds from) a model with a saved file


@dataclass(frozen=True)
class ModelFormat:
    """A saver and the loader that reads its files back into the model the step's restore hook builds."""

    name: str
    saver: Saver
    loader: Loader


_FORMATS: dict[str, ModelFormat] = {}


def register_format(name: str, saver: Saver, loader: Loader) -> ModelFormat:
    """Pair ``saver`` with ``loader`` under ``name`` (names and savers are unique)."""
    for known in _FORMATS.values():
        if known.name == name or known.saver is saver:
            raise ValueError(f"model format {name!r}: {known.name!r} already registers this name or saver")
    _FORMATS[name] = ModelFormat(name, saver, loader)
    return _FORMATS[name]


def format_of(saver: Saver) -> ModelFormat | None:
    """The registered format of ``saver``; None for a saver that nobody paired with a loader."""
    return next((f for f in _FORMATS.values() if f.saver is saver), None)


def format_named(name: str) -> ModelFormat:
    return _FORMATS[name]


WEIGHTS = register_format("weights", save_weights, load_weights)


@dataclass(frozen=True)
class SavedModel:
    """A finished step's model as the run kept it: the file, and how to load it into a model."""

    path: Path
    loader: Loader

    def load(self, model: nn.Module) -> nn.Module:
        return self.loader(model, self.path)


class StepCheckpoints:
    """Where ``ctx.train`` keeps one step's trainer checkpoints: ``train-0``, ``train-1``... per call.

    The runner gives every step its own. A checkpoint is written (atomically) at the end of
    each epoch; when the step runs again after an interruption, each of its ``ctx.train``
    calls resumes from its folder (a finished training just hands back its result).
    ``resume`` False (a run that starts over) never reads a checkpoint; ``stop_after_epoch`` is a
    test hook: interrupt right after that epoch's checkpoint.
    """

    def __init__(self, folder: Path, stop_after_epoch: int | None = None, resume: bool = True):
        self.folder = Path(folder)
        self.stop_after_epoch = stop_after_epoch
        self.resume = resume
        self._calls = 0

    def next_folder(self) -> Path:
        path = self.folder / f"train-{self._calls}"
        self._calls += 1
        return path

    def resume_from(self, folder: Path) -> Path | None:
        """``folder`` when it holds a checkpoint to go on from."""
        return folder if self.resume and (folder / "state.json").is_file() else None

    def callback(self, folder: Path) -> Callback:
        return _SaveEveryEpoch(folder, self.stop_after_epoch)


class _SaveEveryEpoch(Callback):
    """Writes the trainer's checkpoint when an epoch ends (after every other callback's epoch end)."""

    def __init__(self, folder: Path, stop_after_epoch: int | None):
        self.folder = folder
        self.stop_after_epoch = stop_after_epoch

    def on_epoch_end(self, trainer, metrics: dict[str, float]) -> None:
        trainer.save_checkpoint(self.folder)
        if self.stop_after_epoch is not None and metrics["epoch"] == self.stop_after_epoch:
            raise KeyboardInterrupt(f"test hook: stopped after epoch {self.stop_after_epoch}")
