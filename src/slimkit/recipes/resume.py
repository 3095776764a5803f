"""A run's resumable state, ``.NAME.partial/`` beside its output, for ``slimkit run RECIPE --resume``.

What it holds::

    partial.json                      the resolved recipe and its hash; the finished steps: report
                                      figures (latency is measured at the end), weights file, format
    steps/<i>/<weights file>          step i's model, written by the saver in effect after it
    steps/<i>/rng.safetensors         the torch RNG state once step i and its measurement were done
    steps/<i>/files/                  files step i wrote into the run folder (a plot, the .onnx)
    steps/<i>/checkpoints/train-<k>/  the running step's trainer checkpoints (one per ctx.train call)

A run writes it while holding its output's lock (:mod:`slimkit.recipes.output`), so no other run
reads or removes it meanwhile, and removes it once the run folder is complete. A run without
``--resume`` starts over and discards an earlier run's state. Nothing is pickled: safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimkit.errors import BadInputError
from slimkit.recipes.schema import Recipe
from slimkit.recipes.steps.saving import StepCheckpoints, format_of
from slimkit.utils.io import write_json

VERSION = 1
META = "partial.json"
# Test hooks: interrupt a run (as Ctrl-C would) after a step, or after an epoch of a step's training.
STOP_AFTER_STEP = "SLIMKIT_TEST_STOP_AFTER_STEP"  # =STEP_NAME
STOP_AFTER_EPOCH = "SLIMKIT_TEST_STOP_AFTER_EPOCH"  # =STEP_NAME:EPOCH


def partial_folder(output: str | os.PathLike) -> Path:
    final = Path(os.path.abspath(Path(output).expanduser()))
    return final.with_name(f".{final.name}.partial")


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain JSON data (output made absolute): what a resume must match."""
    plain = dict(recipe.to_dict(), output=str(Path(os.path.abspath(Path(recipe.output).expanduser()))))
    return json.loads(json.dumps(plain, default=str))


def recipe_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class FinishedStep:
    index: int
    name: str
    weights: str  # relative to the partial folder
    weights_name: str  # the file name in the run folder
    format: str  # slimkit.recipes.steps.saving format: how the file loads back
    figures: dict[str, Any]
    files: list[str]  # files the step wrote into the run folder, kept under steps/<i>/files


class PartialRun:
    """The resumable state of one run; ``writer`` is False on the other ranks under torchrun."""

    def __init__(self, recipe: Recipe, resume: bool, writer: bool = True):
        self.output, self.folder = recipe.output, partial_folder(recipe.output)
        self.resolved = resolved_recipe(recipe)
        self.hash = recipe_hash(self.resolved)
        self.resume, self.writer = resume, writer
        self.finished: list[FinishedStep] = []
        self.kept_all = True  # False once a step's model could not be kept: later steps are not kept
        self.discarded = False  # a run without --resume found an earlier run's state and dropped it
        if resume:
            self.finished = self._read()
        elif writer and self.folder.exists():
            shutil.rmtree(self.folder)
            self.discarded = True

    def _read(self) -> list[FinishedStep]:
        try:
            meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(
                f"--resume: nothing to resume for {self.output}: no interrupted run to it left "
                f"its state ({self.folder}); run without --resume to start"
            ) from None
        except (OSError, ValueError) as err:
            raise BadInputError(f"--resume: {self.folder / META} cannot be read ({err})") from None
        if meta.get("version") != VERSION or meta.get("recipe_hash") != self.hash:
            changed = differences(meta.get("recipe", {}), self.resolved)
            raise BadInputError(
                f"--resume: the recipe differs from the one that started the interrupted run "
                f"(changed: {', '.join(changed[:5]) or 'slimkit version'}); undo the change, or run "
                "without --resume to start over"
            )
        return [FinishedStep(**step) for step in meta["steps"]]

    # -- while the run goes on --------------------------------------------------------------------------
    def begin(self) -> None:
        """Mark the state resumable from here on (before the first step that is not reused runs)."""
        self._write_meta()

    def checkpoints(self, index: int, step_name: str) -> StepCheckpoints:
        name, _, epoch = os.environ.get(STOP_AFTER_EPOCH, "").partition(":")
        stop = int(epoch) if name == step_name and epoch.isdigit() else None
        return StepCheckpoints(self._step_dir(index) / "checkpoints", stop, resume=self.resume)

    def finish(self, index: int, name: str, current: Any, figures: dict, files: list[Path]) -> None:
        """Keep step ``index``'s model (with the run's saver), figures, files and the RNG state."""
        fmt = format_of(current.saver)
        self.kept_all = self.kept_all and fmt is not None
        if not self.writer or not self.kept_all:
            return
        rng = torch.get_rng_state()
        folder = self._step_dir(index)
        folder.mkdir(parents=True, exist_ok=True)
        current.saver(current.model, folder / current.weights_name)
        save_file({"torch": rng}, str(folder / "rng.safetensors"))
        for path in files:
            _copy(path, folder / "files" / path.name)
        weights = str((folder / current.weights_name).relative_to(self.folder))
        names = [p.name for p in files]
        self.finished.append(
            FinishedStep(index, name, weights, current.weights_name, fmt.name, figures, names)
        )
        self._write_meta()
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)

    def should_stop_after(self, step_name: str) -> bool:
        return os.environ.get(STOP_AFTER_STEP) == step_name

    def discard(self) -> None:
        """The run folder is complete: its resumable state is no longer needed."""
        if self.writer:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- resuming ---------------------------------------------------------------------------------------
    def files_back(self, done: FinishedStep, run_dir: Path) -> None:
        for name in done.files:
            _copy(self._step_dir(done.index) / "files" / name, run_dir / name)

    def restore_rng(self) -> None:
        """The RNG as it was when the last finished step was done: the next step draws what it drew."""
        if self.finished:
            rng = load_file(str(self._step_dir(self.finished[-1].index) / "rng.safetensors"))["torch"]
            torch.set_rng_state(rng)

    def note(self, log: logging.Logger) -> None:
        if self.discarded:
            log.warning(
                "discarded an interrupted run's state in %s (no --resume: starting over)", self.folder
            )
        if self.resume:
            log.info("resuming: %d finished step(s) reused from %s", len(self.finished), self.folder)

    def _step_dir(self, index: int) -> Path:
        return self.folder / "steps" / str(index)

    def _write_meta(self) -> None:
        if self.writer:
            steps = [asdict(step) for step in self.finished]
            meta = {"version": VERSION, "recipe_hash": self.hash, "recipe": self.resolved, "steps": steps}
            write_json(self.folder / META, meta)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)


_MISSING = object()


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths (``steps[1].train.epochs``) where two plain recipes differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        found = []
        for key in keys:
            sub = f"{path}.{key}" if path else str(key)
            found += differences(old.get(key, _MISSING), new.get(key, _MISSING), sub)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [path or "recipe"]
