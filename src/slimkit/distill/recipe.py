"""The ``distill`` recipe step: teach a student with the model as it is (or another) as teacher.

YAML::

    - type: distill
      teacher: self                    # the model before this step (default), or a model mapping
      student: {builtin: digits_cnn, kwargs: {width: 8}}   # or {layers_every: 2}, {prune: {ratio: 0.5}}
                                                            # or "current"
      temperature: 4
      alpha: 0.9
      train: {epochs: 10, lr: 0.003}

``student: current`` keeps the model as it is (a pruned model, say) and
recovers its accuracy from a separate ``teacher`` mapping (the unpruned model).
After the step the recipe's model is the student, so the report row is the
student's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from slimkit.config import from_dict, positive_int, require
from slimkit.distill.callback import DistillationCallback
from slimkit.distill.config import DistillConfig
from slimkit.distill.students import layer_dropped_student, pruned_student, student_models
from slimkit.models.loading import ModelConfig, load_model
from slimkit.recipes.registry import StepType
from slimkit.train import TrainConfig

AUTO_OUTPUT_LOSS = {"classification": "kd", "similarity": "cosine", "regression": "mse"}


@dataclass
class StudentSpec:
    """Exactly one of ``builtin`` (with ``kwargs``), ``layers_every`` (with ``layers_start``/``keep``)
    or ``prune`` (a structured-pruning config applied to a copy of the teacher)."""

    builtin: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    layers_every: int | None = None
    layers_start: int = 0
    keep: list[int] | None = None
    prune: Any = None  # slimkit.prune.StructuredConfig fields

    def __post_init__(self):
        kinds = [self.builtin is not None, self.layers_every is not None or self.keep is not None]
        kinds.append(self.prune is not None)
        require(
            sum(kinds) == 1,
            "builtin",
            "name the student with exactly one of builtin, layers_every/keep or prune",
        )
        if self.prune is not None:
            from slimkit.prune.config import StructuredConfig

            self.prune = from_dict(StructuredConfig, self.prune, "prune")
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


@dataclass
class DistillStepConfig:
    student: Any  # "current" or a StudentSpec mapping
    teacher: Any = "self"  # "self" or a ModelConfig mapping
    temperature: float = 4.0
    alpha: float = 0.9
    output_loss: Literal["auto", "kd", "mse", "cosine", "none"] = "auto"
    hidden_weight: float = 0.0
    hidden_loss: Literal["mse", "cosine"] = "mse"
    attention_weight: float = 0.0
    layer_map: dict[str, str] | None = None
    projection: bool = True
    cache: bool = False  # keep the teacher's outputs (in the run folder, during the step)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self.distill_config(
            "kd", "probe" if self.cache else None
        )  # validates every distillation field, named as in the step
        if isinstance(self.student, str):
            require(
                self.student == "current", "student", "must be 'current' or a mapping (builtin/layers_every)"
            )
        else:
            self.student = from_dict(StudentSpec, self.student, "student")
        if isinstance(self.teacher, str):
            require(
                self.teacher == "self", "teacher", "must be 'self' or a model mapping (builtin/hf/factory)"
            )
        else:
            self.teacher = from_dict(ModelConfig, self.teacher, "teacher")
        require(
            not (self.student == "current" and self.teacher == "self"),
            "teacher",
            "student 'current' needs another model as teacher (e.g. the unpruned one: {hf: minilm})",
        )

    def distill_config(self, output_loss: str, cache: str | None = None) -> DistillConfig:
        return DistillConfig(
            temperature=self.temperature,
            alpha=self.alpha,
            output_loss=output_loss,
            hidden_weight=self.hidden_weight,
            hidden_loss=self.hidden_loss,
            attention_weight=self.attention_weight,
            layer_map=self.layer_map,
            projection=self.projection,
            cache=cache,
        )


def build_teacher(ctx, config: DistillStepConfig) -> torch.nn.Module:
    if config.teacher == "self":
        return copy.deepcopy(ctx.model).eval()
    model, _ = load_model(config.teacher, num_classes=ctx.data.num_classes, input_shape=ctx.data.input_shape)
    return model.eval()


def build_student(ctx, spec: StudentSpec | str, teacher: torch.nn.Module) -> torch.nn.Module:
    if spec == "current":
        return ctx.model
    if spec.builtin is not None:
        from slimkit.models.loading import builtin_kwargs

        cls = student_models()[spec.builtin]
        return cls(**builtin_kwargs(cls, spec.kwargs, ctx.data.num_classes, ctx.data.input_shape))
    if spec.prune is not None:
        n = spec.prune.calibration_batches * 32
        batches = ctx.calibration_batches(n, batch_size=32)
        return pruned_student(teacher, spec.prune, calibration=batches, forward=ctx.task.forward)
    return layer_dropped_student(
        teacher, every=spec.layers_every or 1, start=spec.layers_start, keep=spec.keep
    )


def run_distill(ctx, config: DistillStepConfig) -> None:
    teacher = build_teacher(ctx, config)
    student = build_student(ctx, config.student, teacher)
    output_loss = AUTO_OUTPUT_LOSS[ctx.task.task] if config.output_loss == "auto" else config.output_loss
    cache = ctx.run_dir / ".teacher-cache.safetensors" if config.cache else None
    cb = DistillationCallback(teacher, config.distill_config(output_loss, cache), forward=ctx.task.forward)
    # Both models meet one real batch before any training: unmatched outputs fail here.
    cb.check(student, next(iter(ctx.task.loader(ctx.data.train, 8))))
    ctx.model = student
    try:
        result = ctx.train(copy.deepcopy(config.train), callbacks=[cb])
    finally:
        if cache is not None:
            cache.unlink(missing_ok=True)
    last = result.history[-1] if result.history else {}
    ctx.notes.update(
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        output_loss=output_loss,
        temperature=config.temperature,
        alpha=config.alpha,
        epochs=len(result.history),
        train_samples_per_s=round(result.samples_per_s, 1),
        train_time_s=round(result.train_time_s, 2),
        best_epoch=result.best_epoch,
        **{k: round(v, 5) for k, v in last.items() if k.startswith("distill_")},
    )
    ctx.log.info(
        "distill: %s -> student, %d epochs, %.1f samples/s",
        "self" if config.teacher == "self" else "teacher",
        len(result.history),
        result.samples_per_s,
    )


STEPS = {
    "distill": StepType(
        DistillStepConfig,
        run_distill,
        changes_model=True,
        doc="train a student (built-in, layers of the teacher, or the current model) from a teacher",
    )
}
