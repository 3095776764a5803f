"""The recipe step contract: what a step sees, what it hands back, and the table of step types.

A step is ``run(ctx: RunContext, cfg) -> StepResult``. ``RunContext`` is frozen:
a step never changes the run's state itself; it may change ``ctx.model`` in
place (or build another model) and returns the model, and, when the model is
stored differently from here on (sparse, packed, ONNX), the saver and file
name. Only the runner applies a result, so what a report row says and what the
run folder holds come from one place. Step configs are frozen too, so
``recipe.resolved.yaml`` is what the user wrote plus defaults, whatever ran.

Step types register themselves with :func:`register_step`; the package's
``__init__`` imports every step module, so importing ``slimkit.recipes.steps``
fills the table (no module is looked up by name).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.batch import batch_len
from slimkit.config import from_dict, short_repr, to_dict
from slimkit.data.base import DataBundle
from slimkit.errors import ConfigError
from slimkit.recipes.measure import MeasureConfig
from slimkit.recipes.steps.saving import SavedModel, Saver, StepCheckpoints
from slimkit.tasks import TaskAdapter
from slimkit.train import Callback, TrainConfig, Trainer, TrainResult, distributed


@dataclass(frozen=True)
class RunContext:
    """Everything a step may read. ``model`` is the model as the previous step left it."""

    model: nn.Module
    data: DataBundle
    task: TaskAdapter
    run_dir: Path
    log: logging.Logger
    measure: MeasureConfig
    tokenizer: Any = None
    seed: int = 0
    progress: bool = True  # False under --quiet: no progress bars, whatever a step's train config says
    # Where ctx.train checkpoints every epoch, and resumes from after an interruption (set by the runner)
    checkpoints: StepCheckpoints | None = None
    # The recipe's model mapping (a ModelConfig): a step that needs the starting model again reloads
    # it from here (distill's teacher: initial) instead of the run keeping a copy of it.
    model_spec: Any = None

    def train(
        self,
        model: nn.Module,
        config: TrainConfig,
        callbacks: Sequence[Callback] = (),
        val: bool = True,
        loss_fn: Callable | None = None,
    ) -> TrainResult:
        """Train ``model`` in place with the recipe's task (forward, loss, collate) on the train split.

        Under the runner each epoch ends with a checkpoint, and a step run again after an
        interruption resumes from it (weights, optimizer, RNG, the callbacks' state).
        """
        config = dataclasses.replace(config, progress=config.progress and self.progress)
        val_data = self.data.val if val else None
        extra, resume_from = self.checkpointing()
        callbacks = [*callbacks, *extra]
        trainer = Trainer(
            model,
            config,
            callbacks=callbacks,
            forward=self.task.forward,
            loss_fn=loss_fn or self.task.loss_fn,
            task=self.task.task,
            collate_fn=self.task.collate_fn,
            evaluate=(lambda m: self.task.evaluate(m, val_data)) if val_data else None,
        )
        return trainer.fit(self.data.train, val_data, resume_from=resume_from)

    def checkpointing(self) -> tuple[list[Callback], Path | None]:
        """For one training run of the step: the callbacks that checkpoint it every epoch, and the
        checkpoint to resume from (None: start). Steps whose library trains with its own Trainer
        (finetune, multitask) pass both on, so they resume mid-step like ``train`` does."""
        if self.checkpoints is None:
            return [], None
        folder = self.checkpoints.next_folder()
        resume_from = self.checkpoints.resume_from(folder)
        if resume_from is not None:
            self.log.info("  training resumes from its last checkpoint (%s)", folder.name)
        return [self.checkpoints.callback(folder)], resume_from

    def calibration_batches(
        self, n: int, batch_size: int = 32, split: str = "train", shard: bool = False
    ) -> list[Any]:
        """At least ``n`` samples (whole batches, in order) from the start of a split, for calibration.

        ``shard``: under torchrun, this process's share of those batches (rank-strided, whole
        batches), for a caller whose statistics are summed across the processes (quantize):
        N processes then calibrate on the very batches one process would.
        """
        out, seen = [], 0
        for batch in self.task.loader(getattr(self.data, split), batch_size):
            out.append(batch)
            seen += batch_len(batch)
            if seen >= n:
                break
        env = distributed.current() if shard else None
        if env is None:
            return out
        if len(out) < env.world_size:
            raise ConfigError(
                "calibration_samples",
                f"{n} samples make {len(out)} batch(es) of {batch_size}, fewer than the {env.world_size} "
                f"processes under torchrun (each needs one): use at least {env.world_size * batch_size}",
            )
        return out[env.rank :: env.world_size]


@dataclass(frozen=True)
class StepResult:
    """What a step hands back; ``None`` keeps the previous step's saver / weights file name."""

    model: nn.Module
    saver: Saver | None = None
    weights_name: str | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)  # extras for the step's report row


@dataclass(frozen=True)
class StepType:
    """A registered step: its config class, its run function and where it may stand in a recipe.

    The config class is a frozen dataclass read with ``from_dict``. It may also define ``MOVED``
    (an old dotted key -> the message naming its new spelling), and, where its YAML is not its
    fields one to one (quantize: the key names the method), ``from_yaml(body, path)`` and ``to_yaml()``.
    """

    name: str
    config: type
    run: Callable[[RunContext, Any], StepResult]
    doc: str = ""
    last_only: bool = False  # nothing can follow it (export: the model has left PyTorch)
    # check_before(earlier_steps, path): raise ConfigError if an earlier step makes this one impossible
    check_before: Callable[[list, str], None] | None = None
    # restore(ctx, cfg, saved) -> the model this step made, rebuilt from its saved file (--resume)
    restore: Callable[[RunContext, Any, SavedModel], nn.Module] | None = None

    def rebuild(self, ctx: RunContext, config: Any, saved: SavedModel) -> nn.Module:
        """The step's model from its saved file, ``ctx.model`` being the model before the step."""
        return (self.restore or restore_in_place)(ctx, config, saved)

    def parse(self, body: Mapping[str, Any], path: str) -> Any:
        """The step's config from its YAML mapping (without ``type``/``name``); old spellings refused."""
        for key, message in getattr(self.config, "MOVED", {}).items():
            if _has(body, key.split(".")):
                raise ConfigError(f"{path}.{key}", message)
        from_yaml = getattr(self.config, "from_yaml", None)
        return from_yaml(body, path) if from_yaml is not None else from_dict(self.config, body, path)

    def dump(self, config: Any) -> dict[str, Any]:
        """Plain data that :meth:`parse` reads back to the same config (the resolved recipe)."""
        to_yaml = getattr(config, "to_yaml", None)
        return to_yaml() if to_yaml is not None else to_dict(config)


def _has(body: Any, keys: list[str]) -> bool:
    """Whether the dotted key (``finetune.train``) is written in the step's mapping."""
    for key in keys:
        if not isinstance(body, Mapping) or key not in body:
            return False
        body = body[key]
    return True


_STEPS: dict[str, StepType] = {}


def register_step(
    name: str,
    *,
    config: type,
    doc: str = "",
    last_only: bool = False,
    check_before: Callable[[list, str], None] | None = None,
    restore: Callable[[RunContext, Any, SavedModel], nn.Module] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``run(ctx, cfg) -> StepResult`` as step type ``name`` (names are unique).

    ``restore(ctx, cfg, saved)`` rebuilds the step's model from the file the run kept when the step
    finished, for ``--resume``: by default the file is loaded into ``ctx.model`` (the model before the
    step), right for every step that changes the model in place; a step that builds another model
    (a new student, a model with a task head) builds it the same way and loads into it.
    """

    def decorate(run: Callable[[RunContext, Any], StepResult]) -> Callable[[RunContext, Any], StepResult]:
        if name in _STEPS:
            raise ValueError(
                f"recipe step type {name!r} is already registered by {_STEPS[name].run.__module__}"
            )
        _STEPS[name] = StepType(name, config, run, doc, last_only, check_before, restore)
        return run

    return decorate


def restore_in_place(ctx: RunContext, config: Any, saved: SavedModel) -> nn.Module:
    """The default restore hook: the step changed ``ctx.model`` in place, so its file loads into it."""
    return saved.load(ctx.model)


def available_steps() -> dict[str, StepType]:
    return dict(_STEPS)


def step_type(name: Any, path: str) -> StepType:
    if isinstance(name, str) and name in _STEPS:
        return _STEPS[name]
    raise ConfigError(path, f"unknown step type {short_repr(name)} (available: {', '.join(_STEPS)})")


def moved_under(block: str, keys: Sequence[str], what: str) -> dict[str, str]:
    """``MOVED`` entries for settings that now live in the ``block:`` mapping of a step."""
    return {key: f"{what} are now under '{block}:', e.g. '{block}: {{{key}: ...}}'" for key in keys}


TRAIN_MOVED = "recovery training is now 'train:' in every step"
NESTED_TRAIN = "training settings are the step's own 'train:', beside '{block}:'"


@contextmanager
def under(key: str) -> Iterator[None]:
    """Name errors that a library raises about its config by where that config sits in the step."""
    try:
        yield
    except ConfigError as err:
        raise err.prefixed(key) from None


def library_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (a step shares a library config's default)."""
    (found,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


def without(plain: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in plain.items() if k not in keys}


def set_field(config: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen step config while it is being constructed (never afterwards)."""
    object.__setattr__(config, name, value)
