"""The ``distill`` step: teach a student with the model as it is (or another model) as teacher.

YAML::

    - type: distill
      teacher: self                    # the model before this step (default), initial (the recipe's
                                       # starting model, reloaded), or a model mapping
      student: {builtin: digits_cnn, kwargs: {width: 8}}   # or {layers_every: 2}, {prune: {ratio: 0.5}},
                                                            # or current
      distill: {temperature: 4, alpha: 0.9}                 # slimkit.distill.DistillConfig
      train: {epochs: 10, lr: 0.003}

``student: current`` keeps the model as it is (a pruned model, say) and
recovers its accuracy from a separate ``teacher`` mapping (the unpruned model)
or ``teacher: initial``, the recipe's own model reloaded as the recipe's
``model:`` names it. After the step the recipe's model is the student, so the
report row is the student's.

Causal language models (recovery of a pruned LLM)::

    - type: distill
      student: current
      teacher: initial
      distill: {temperature: 1, alpha: 1.0}      # output_loss auto: token_kd for language_modeling
      seq_len: 512                               # training windows (evaluation keeps data.seq_len)
      autocast: bf16                             # forward passes in bf16 (weights stay float32)
      extra_data: [{name: tinyshakespeare, path: ../shared/data/tinyshakespeare}]
      train: {epochs: 1, batch_size: 4, lr: 1e-4, max_steps: 400}

The teacher runs live (eval mode, no gradients, cast to the student's dtype); ``distill.top_k``
(with or without ``cache: true``) distils against its top-k log-probabilities instead. For a
depth-pruned student the hidden-state pairs (``hidden_weight``) default to each kept block and
the teacher block it came from. ``extra_data`` adds the train part of other text corpora to the
recipe data's train part (never a test part), cut into the same windows.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import ConcatDataset

from slimkit.config import from_dict, positive_int, require
from slimkit.data.lm import LM_TASK, TokenWindows, prepare_for_model
from slimkit.data.registry import DataConfig, load_data
from slimkit.distill import DistillationCallback, DistillConfig, layer_dropped_student
from slimkit.distill.students import student_models
from slimkit.errors import ConfigError
from slimkit.models.loading import ModelConfig, builtin_kwargs, load_model
from slimkit.prune import StructuredConfig, prune_
from slimkit.prune.depth import kept_blocks
from slimkit.recipes.steps.base import RunContext, StepResult, moved_under, register_step, set_field, under
from slimkit.recipes.steps.saving import SavedModel
from slimkit.train import TrainConfig

AUTO_OUTPUT_LOSS = {
    "classification": "kd",
    "similarity": "cosine",
    "regression": "mse",
    "language_modeling": "token_kd",
}
TEACHERS = ("self", "initial")


@dataclass
class DistillSettings(DistillConfig):
    """:class:`DistillConfig` as a recipe writes it: ``output_loss: auto`` picks the loss by the task
    (kd for classifiers, token_kd for causal LMs, cosine for sentence encoders, mse for regression);
    ``cache: true`` keeps the teacher's outputs in the run folder during the step."""

    output_loss: Literal["auto", "kd", "token_kd", "mse", "cosine", "none"] = "auto"
    cache: bool = False

    def __post_init__(self):
        # validates every field, named as written (top_k only exists for language models)
        self.for_task("language_modeling" if self.top_k is not None else "classification", Path("probe"))

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
    teacher: Any = "self"  # "self", "initial" or a ModelConfig mapping
    distill: DistillSettings = field(default_factory=DistillSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int | None = None  # language models: tokens per training window (default data.seq_len)
    autocast: Literal["off", "bf16"] = "off"  # student and teacher forward passes under bf16 autocast
    extra_data: list[DataConfig] = field(default_factory=list)  # language models: more training text

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
                self.teacher in TEACHERS,
                "teacher",
                "must be 'self', 'initial' or a model mapping (builtin/hf/factory)",
            )
        else:
            set_field(self, "teacher", from_dict(ModelConfig, self.teacher, "teacher"))
        require(
            not (self.student == "current" and self.teacher == "self"),
            "teacher",
            "student 'current' needs another model as teacher (e.g. the unpruned one: initial or {hf: minilm})",
        )
        if self.seq_len is not None:
            require(
                isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool) and self.seq_len >= 2,
                "seq_len",
                "must be an integer >= 2",
            )


def build_teacher(ctx: RunContext, cfg: DistillStep) -> torch.nn.Module:
    if cfg.teacher == "self":
        return copy.deepcopy(ctx.model).eval()
    spec = ctx.model_spec if cfg.teacher == "initial" else cfg.teacher
    if spec is None:
        raise ConfigError("teacher", "'initial' needs the recipe's model (run the step from a recipe)")
    model, _ = load_model(spec, num_classes=ctx.data.num_classes, input_shape=ctx.data.input_shape)
    # The teacher computes in the student's dtype (a bf16 student gets a bf16 teacher, not fp32 logits).
    dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), None)
    device = next((p.device for p in ctx.model.parameters()), None)
    return model.to(device=device, dtype=dtype).eval() if dtype is not None else model.eval()


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


def with_training_text(ctx: RunContext, cfg: DistillStep) -> RunContext:
    """The context whose train split is what this step trains on: for a language model, the recipe
    data's train part re-cut into ``seq_len`` windows plus the train parts of ``extra_data``."""
    if ctx.task.task != LM_TASK:
        for key in ("seq_len", "extra_data"):
            require(not getattr(cfg, key), key, "applies to language-modelling data only")
        return ctx
    own = ctx.data.train
    seq_len = cfg.seq_len or own.seq_len
    parts = [own if seq_len == own.seq_len else TokenWindows(own.ids, seq_len, source=own.source)]
    for i, data_cfg in enumerate(cfg.extra_data):
        path = f"extra_data[{i}]"
        bundle = load_data(dataclasses.replace(data_cfg, seq_len=seq_len), prefix=path)
        require(bundle.task == LM_TASK, f"{path}.name", "must be text for language modelling")
        # only the train part is used: each corpus's own test part stays held out
        parts.append(prepare_for_model(bundle, ctx.model, ctx.tokenizer).train)
    train = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, train=train))


def bf16_forward(forward):
    """``forward`` under bfloat16 autocast (weights stay float32, matmuls run in bf16): on CPUs with
    AVX512-BF16 a distillation step of SmolLM2 runs about 1.6x faster (measured, bench/README)."""

    def run(model, batch):
        device = next(model.parameters()).device.type
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return forward(model, batch)

    return run


def kept_block_map(student: torch.nn.Module) -> dict[str, str] | None:
    """A depth-pruned student's hidden-state pairs: each block and the teacher block it came from."""
    kept = kept_blocks(student)
    if kept is None:
        return None
    name, origin = kept
    return {f"{name}.{i}": f"{name}.{j}" for i, j in enumerate(origin)}


def lm_notes(ctx: RunContext, settings: DistillConfig, result, block_map) -> dict[str, Any]:
    """What a language model's recovery ran on: windows, tokens/s, how the teacher was read."""
    train = ctx.data.train
    seq_len = train.datasets[0].seq_len if isinstance(train, ConcatDataset) else train.seq_len
    notes: dict[str, Any] = {
        "steps": result.steps,
        "train_windows": len(train),
        "seq_len": seq_len,
        "train_tokens_per_s": round(result.samples_per_s * seq_len, 1),
        "teacher_logits": f"top-{settings.top_k} ({'cached' if settings.cache else 'live'})"
        if settings.top_k
        else "live (full vocabulary)",
    }
    if settings.hidden_weight > 0:
        notes["hidden_pairs"] = "kept blocks" if settings.layer_map == block_map else "uniform"
    return notes


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
    ctx = with_training_text(ctx, cfg)
    if cfg.autocast == "bf16":
        ctx = dataclasses.replace(
            ctx, task=dataclasses.replace(ctx.task, forward=bf16_forward(ctx.task.forward))
        )
    teacher = build_teacher(ctx, cfg)
    student = build_student(ctx, cfg.student, teacher)
    cache = ctx.run_dir / ".teacher-cache.safetensors" if cfg.distill.cache else None
    settings = cfg.distill.for_task(ctx.task.task, cache)
    if settings.uses_layers and settings.layer_map is None and cfg.student == "current":
        settings = dataclasses.replace(settings, layer_map=kept_block_map(student))
    callback = DistillationCallback(teacher, settings, forward=ctx.task.forward)
    # Both models meet one real batch before any training: unmatched outputs fail here (one window
    # of a language model: its logits are tokens x vocabulary per sample).
    lm = ctx.task.task == LM_TASK
    callback.check(student, next(iter(ctx.task.loader(ctx.data.train, 1 if lm else 8))))
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
    if lm:
        notes.update(lm_notes(ctx, settings, result, kept_block_map(student)))
    if cfg.autocast != "off":
        notes["autocast"] = cfg.autocast
    ctx.log.info(
        "distill: %s -> student, %d epochs, %.1f samples/s",
        "self" if cfg.teacher == "self" else "teacher",
        len(result.history),
        result.samples_per_s,
    )
    return StepResult(student, notes=notes)
