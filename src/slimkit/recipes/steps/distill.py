"""The ``distill`` step: teach a student with the model as it is (or another model) as teacher.

YAML::

    - type: distill
      teacher: self                    # the model before this step (default), or a model mapping
      student: {builtin: digits_cnn, kwargs: {width: 8}}   # or {layers_every: 2}, {prune: {ratio: 0.5}},
                                                            # or current
      distill: {temperature: 4, alpha: 0.9}                 # slimkit.distill.DistillConfig
      train: {epochs: 10, lr: 0.003}

``student: current`` keeps the model as it is (a pruned model, say) and
recovers its accuracy from a separate ``teacher`` mapping (the unpruned model).
After the step the recipe's model is the student, so the report row is the
student's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from slimkit.config import from_dict, positive_int, require
from slimkit.distill import DistillationCallback, DistillConfig, layer_dropped_student
from slimkit.distill.students import student_models
from slimkit.models.loading import ModelConfig, builtin_kwargs, load_model
from slimkit.prune import StructuredConfig, prune_
from slimkit.recipes.steps.base import RunContext, StepResult, moved_under, register_step, set_field, under
from slimkit.recipes.steps.saving import SavedModel
from slimkit.train import TrainConfig

AUTO_OUTPUT_LOSS = {"classification": "kd", "similarity": "cosine", "regression": "mse"}


@dataclass
class DistillSettings(DistillConfig):
    """:class:`DistillConfig` as a recipe writes it: ``output_loss: auto`` picks the loss by the task
    (kd for classifiers, cosine for sentence encoders, mse for regression); ``cache: true`` keeps the
    teacher's outputs in the run folder during the step."""

    output_loss: Literal["auto", "kd", "mse", "cosine", "none"] = "auto"
    cache: bool = False

    def __post_init__(self):
        self.for_task("classification", Path("probe"))  # validates every field, named as written

    def for_task(self, task: str, cache_file: Path | None) -> DistillConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(DistillConfig)}
        loss = AUTO_OUTPUT_LOSS[task] if self.output_loss == "auto" else self.output_loss
        return DistillConfig(
            **{**values, "output_loss": loss, "cache": str(cache_file) if self.cache else None}
        )


@dataclass(frozen=True)
class StudentSpec:
    """Exactly one of ``builtin`` (with ``kwargs``), ``layers_every`` (with ``layers_start``/``keep``)
    or ``prune`` (a structured-pruning config applied to a copy of the teacher)."""

    builtin: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    layers_every: int | None = None
    layers_start: int = 0
    keep: list[int] | None = None
    prune: StructuredConfig | None = None

    def __post_init__(self):
        kinds = [self.builtin is not None, self.layers_every is not None or self.keep is not None]
        kinds.append(self.prune is not None)
        require(
            sum(kinds) == 1,
            "builtin",
            "name the student with exactly one of builtin, layers_every/keep or prune",
        )
        if self.builtin is not None:
            models = student_models()
            require(
                self.builtin in models, "builtin", f"must be one of {', '.join(models)}; got {self.builtin!r}"
            )
        if self.layers_every is not None:
            positive_int(self.layers_every, "layers_every")
        require(
            isinstance(self.layers_start, int) and self.layers_start >= 0,
            "layers_start",
            "must be an integer >= 0",
        )


@dataclass(frozen=True)
class DistillStep:
    student: Any  # "current" or a StudentSpec mapping
    teacher: Any = "self"  # "self" or a ModelConfig mapping
    distill: DistillSettings = field(default_factory=DistillSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    MOVED: ClassVar[dict[str, str]] = moved_under(
        "distill", [f.name for f in dataclasses.fields(DistillConfig)], "distillation settings"
    )

    def __post_init__(self):
        if isinstance(self.student, str):
            require(
                self.student == "current", "student", "must be 'current' or a mapping (builtin/layers_every)"
            )
        else:
            set_field(self, "student", from_dict(StudentSpec, self.student, "student"))
        if isinstance(self.teacher, str):
            require(
                self.teacher == "self", "teacher", "must be 'self' or a model mapping (builtin/hf/factory)"
            )
        else:
            set_field(self, "teacher", from_dict(ModelConfig, self.teacher, "teacher"))
        require(
            not (self.student == "current" and self.teacher == "self"),
            "teacher",
            "student 'current' needs another model as teacher (e.g. the unpruned one: {hf: minilm})",
        )


def build_teacher(ctx: RunContext, cfg: DistillStep) -> torch.nn.Module:
    if cfg.teacher == "self":
        return copy.deepcopy(ctx.model).eval()
    model, _ = load_model(cfg.teacher, num_classes=ctx.data.num_classes, input_shape=ctx.data.input_shape)
    return model.eval()


def build_student(ctx: RunContext, spec: StudentSpec | str, teacher: torch.nn.Module) -> torch.nn.Module:
    if spec == "current":
        return ctx.model
    if spec.builtin is not None:
        cls = student_models()[spec.builtin]
        return cls(**builtin_kwargs(cls, spec.kwargs, ctx.data.num_classes, ctx.data.input_shape))
    if spec.prune is not None:
        # A structurally pruned copy of the teacher: distilling it from the teacher recovers what pruning lost.
        student = copy.deepcopy(teacher)
        batches = ctx.calibration_batches(spec.prune.calibration_batches * 32, batch_size=32)
        with under("student.prune"):
            prune_(student, spec.prune, calibration=batches, forward=ctx.task.forward)
        return student
    return layer_dropped_student(
        teacher, every=spec.layers_every or 1, start=spec.layers_start, keep=spec.keep
    )


def restore_distill(ctx: RunContext, cfg: DistillStep, saved: SavedModel) -> torch.nn.Module:
    """--resume: the student built as the step builds it (a teacher only where it is made from one)."""
    spec = cfg.student
    needs_teacher = spec != "current" and spec.builtin is None
    student = build_student(ctx, spec, build_teacher(ctx, cfg) if needs_teacher else None)
    return saved.load(student)


@register_step(
    "distill",
    config=DistillStep,
    doc="train a student (built-in, layers of the teacher, or the current model) from a teacher",
    restore=restore_distill,
)
def run_distill(ctx: RunContext, cfg: DistillStep) -> StepResult:
    teacher = build_teacher(ctx, cfg)
    student = build_student(ctx, cfg.student, teacher)
    cache = ctx.run_dir / ".teacher-cache.safetensors" if cfg.distill.cache else None
    settings = cfg.distill.for_task(ctx.task.task, cache)
    callback = DistillationCallback(teacher, settings, forward=ctx.task.forward)
    # Both models meet one real batch before any training: unmatched outputs fail here.
    callback.check(student, next(iter(ctx.task.loader(ctx.data.train, 8))))
    try:
        result = ctx.train(student, cfg.train, callbacks=[callback])
    finally:
        if cache is not None:
            cache.unlink(missing_ok=True)
    last = result.history[-1] if result.history else {}
    notes = {
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "output_loss": settings.output_loss,
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "epochs": len(result.history),
        "train_samples_per_s": round(result.samples_per_s, 1),
        "train_time_s": round(result.train_time_s, 2),
        "best_epoch": result.best_epoch,
        **{k: round(v, 5) for k, v in last.items() if k.startswith("distill_")},
    }
    ctx.log.info(
        "distill: %s -> student, %d epochs, %.1f samples/s",
        "self" if cfg.teacher == "self" else "teacher",
        len(result.history),
        result.samples_per_s,
    )
    return StepResult(student, notes=notes)
