"""What a run keeps so that ``slimkit run RECIPE --resume`` can go on after an interruption.

Two things, both written by the runner into the run's resumable state
(:mod:`slimkit.recipes.resume`):

- each finished step's model, written by the saver in effect after the step
  (sparse, pruned, quantized, ONNX). A saver is paired here with the loader
  that reads its files back (:func:`register_format`); a step type rebuilds
  the model that such a file loads into with its ``restore`` hook
  (see :func:`slimkit.recipes.steps.base.register_step`). A causal LM starts
  in the ``hf_folder`` format (:func:`first_format`): a plain Hugging Face
  folder as long as it has no integer layers;
- the trainer checkpoints of the step that is running: ``ctx.train`` writes one
  at the end of every epoch into the folder :class:`StepCheckpoints` gives it,
  and resumes from it when the step runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimkit.models.causal_lm import is_causal_lm
from slimkit.models.hf_folder import bf16_linears, load_hf_folder, save_hf_folder
from slimkit.quant.modules import BF16Linear
from slimkit.quant.plan import set_module
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
    file_name: str = "model.safetensors"  # its name in the run folder (a folder for hf_folder)


_FORMATS: dict[str, ModelFormat] = {}


def register_format(
    name: str, saver: Saver, loader: Loader, file_name: str = "model.safetensors"
) -> ModelFormat:
    """Pair ``saver`` with ``loader`` under ``name`` (names and savers are unique); ``file_name`` is
    what the run folder calls the saved model when the step that sets the saver names none."""
    for known in _FORMATS.values():
        if known.name == name or known.saver is saver:
            raise ValueError(f"model format {name!r}: {known.name!r} already registers this name or saver")
    _FORMATS[name] = ModelFormat(name, saver, loader, file_name)
    return _FORMATS[name]


def format_of(saver: Saver) -> ModelFormat | None:
    """The registered format of ``saver``; None for a saver that nobody paired with a loader."""
    return next((f for f in _FORMATS.values() if f.saver is saver), None)


def format_named(name: str) -> ModelFormat:
    return _FORMATS[name]


WEIGHTS = register_format("weights", save_weights, load_weights)


def load_model_folder(model: nn.Module, path: Path) -> nn.Module:
    """Fill the float model from a Hugging Face folder, its bfloat16 Linear layers rebuilt as such.

    A folder whose config has other shapes (a pruned model: fewer blocks, heads or neurons) is
    loaded into a model of the same class built from the folder's config.
    """
    model = _shaped_like_folder(model, path)
    for name in bf16_linears(path):
        set_module(model, name, BF16Linear.from_float(model.get_submodule(name)))
    return load_hf_folder(model, path)


def _shaped_like_folder(model: nn.Module, path: Path) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None or not (Path(path) / "config.json").is_file():
        return model
    stored = type(config).from_pretrained(path)
    with torch.device("meta"):
        reference = type(model)(stored)
    shapes = {k: t.shape for k, t in model.state_dict().items()}
    if {k: t.shape for k, t in reference.state_dict().items()} == shapes:
        return model
    stored._attn_implementation = config._attn_implementation
    fresh = type(model)(stored).to(next(model.parameters()).dtype)
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    return fresh.train(model.training)


# A causal LM with float (or bfloat16) weights is kept as a folder that Hugging Face opens by itself.
HF_FOLDER = register_format("hf_folder", save_hf_folder, load_model_folder, file_name="model")


def first_format(model: nn.Module) -> ModelFormat:
    """How a run keeps the model it loaded until a step stores it otherwise."""
    return HF_FOLDER if is_causal_lm(model) else WEIGHTS


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
