"""The rows of the conformance table (tests/test_conformance.py): one per technique method.

A row says how to run its method's verb on a tiny model, its error bound
against the float model (``None`` where the method trains a new function on
purpose, e.g. a task head), how its result is saved and loaded, which of its
family's non-``_`` functions must leave their input alone, a bad config with
the field its error must name, and its recipe step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit import activations, distill, prune, quant, transfer
from slimkit.metrics import count_macs, count_parameters, saved_size
from slimkit.prune.methods import PRUNE_METHODS
from slimkit.prune.unstructured import magnitude_masks
from slimkit.train import TrainConfig
from slimkit.transfer.config import STRATEGIES
from slimkit.utils.io import load_weights, save_weights

Apply = Callable[[nn.Module, str, Callable], nn.Module]


@dataclass(frozen=True)
class Row:
    family: str
    method: str
    models: tuple[str, ...]
    apply: Apply  # (model, model name, example(name, n)) -> the model after the method
    bound: float | None  # max relative L2 error of the main output vs the float model
    save: Callable[[nn.Module, Path], int]
    load: Callable[[nn.Module, Path, str], nn.Module]  # (fresh float model, path, model name) -> model
    bad: tuple[Callable[[], object], str]  # builds a bad config; the error must name the field
    step: dict  # the recipe step run through the CLI
    pure: tuple[Callable, ...] = ()  # non-_ functions (model, inputs) that must not change the model
    text_step: bool = False  # the step needs a text model and data (tiny BERT + a toy CSV)
    changes_model: bool = True
    variant: str = ""  # a second row of the same method (another setting worth checking end to end)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.method}" + (f"[{self.variant}]" if self.variant else "")


def _measure(model: nn.Module, inputs) -> None:
    """The measurement functions every report row calls on every step's model."""
    count_parameters(model)
    saved_size(model)
    count_macs(model, inputs)


def _plain_load(fresh: nn.Module, path: Path, _name: str) -> nn.Module:
    return load_weights(fresh, path)


# -- pruning -----------------------------------------------------------------------------------


def _magnitude(model, name, example):
    summary = prune.prune_(model, prune.MagnitudeConfig(sparsity=0.3))
    return prune.finalize_(model, summary.masks)


def _keep_batchnorm_statistics(model: nn.Module) -> None:
    """Training-mode passes leave BatchNorm statistics alone: the bound measures the method, not them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0


def _train_briefly(model, name, example, callbacks=()):
    """A few optimizer steps at a tiny learning rate: the callbacks act, the weights barely move."""
    x = example(name, 16)
    data = TensorDataset(x, torch.randint(0, 10, (len(x),)))
    config = TrainConfig(epochs=2, lr=1e-7, batch_size=4, progress=False, optimizer="sgd")
    from slimkit.train import Trainer

    _keep_batchnorm_statistics(model)
    Trainer(model, config, callbacks=list(callbacks)).fit(data)
    return model.eval()


def _gradual(model, name, example):
    cfg = prune.GradualConfig(final_sparsity=0.3, start_step=0, end_step=4, frequency=1)
    summary = prune.prune_(model, cfg)
    _train_briefly(model, name, example, [summary.callback])
    return prune.finalize_(model, summary.masks)


def _structured(model, name, example):
    # on the Llama: FFN neurons and one of its two key/value groups (with the query heads sharing it)
    gqa = {"gqa": "groups", "head_ratio": 0.5} if name == "llama" else {}
    prune.prune_(
        model, prune.StructuredConfig(ratio=0.25, importance="l1", **gqa), example_inputs=example(name)
    )
    return model


def _depth(model, name, example):
    prune.prune_(model, prune.DepthConfig(blocks=1, importance="angular"), example_inputs=example(name))
    return model


def _calibrated(config_fn: Callable[[], object]) -> Apply:
    def apply(model, name, example):
        prune.prune_(model, config_fn(), calibration_data=[example(name, 16)])
        return model

    return apply


def _analyze(model, inputs):
    prune.analyze(model, inputs)


def _masks(model, inputs):
    magnitude_masks(model, prune.MagnitudeConfig(sparsity=0.5))


PRUNE_ROWS = [
    Row("prune", "magnitude", ("mlp", "cnn", "bert", "llama"), _magnitude, 0.5, prune.save_sparse,
        lambda fresh, path, _n: prune.load_sparse(fresh, path),
        (lambda: prune.MagnitudeConfig(sparsity=1.5), "sparsity"),
        {"type": "prune", "magnitude": {"sparsity": 0.5}}, pure=(_masks, _analyze, _measure)),
    Row("prune", "gradual", ("mlp", "cnn"), _gradual, 0.5, prune.save_sparse,
        lambda fresh, path, _n: prune.load_sparse(fresh, path),
        (lambda: prune.GradualConfig(final_sparsity=1.0), "final_sparsity"),
        {"type": "prune", "gradual": {"final_sparsity": 0.5, "end_step": 20, "frequency": 5},
         "train": {"epochs": 1, "lr": 0.001, "progress": False}}, pure=(_analyze, _measure)),
    Row("prune", "structured", ("mlp", "cnn", "bert", "llama"), _structured, 0.8, prune.save_pruned,
        lambda fresh, path, _n: prune.load_pruned(fresh, path),
        (lambda: prune.StructuredConfig(ratio=1.5), "ratio"),
        {"type": "prune", "structured": {"ratio": 0.25, "importance": "l1"}}, pure=(_analyze, _measure)),
    Row("prune", "wanda", ("mlp", "cnn", "bert", "llama"), _calibrated(lambda: prune.WandaConfig(sparsity=0.3)),
        0.5, prune.save_sparse, lambda fresh, path, _n: prune.load_sparse(fresh, path),
        (lambda: prune.WandaConfig(sparsity=1.0), "sparsity"),
        {"type": "prune", "wanda": {"sparsity": 0.5}, "calibration_samples": 64}, pure=(_measure,)),
    Row("prune", "sparsegpt", ("mlp", "cnn", "bert", "llama"),
        _calibrated(lambda: prune.SparseGPTConfig(n_m="2:4")), 0.5, prune.save_sparse,
        lambda fresh, path, _n: prune.load_sparse(fresh, path),
        (lambda: prune.SparseGPTConfig(sparsity=0.5, n_m="2:4"), "sparsity"),
        {"type": "prune", "sparsegpt": {"n_m": "2:4"}, "calibration_samples": 64}, pure=(_measure,)),
    # one of two random blocks dropped: a large change by design (recovery is distillation's job)
    Row("prune", "depth", ("bert", "llama"), _depth, 1.0, prune.save_pruned,
        lambda fresh, path, _n: prune.load_pruned(fresh, path),
        (lambda: prune.DepthConfig(ratio=1.0), "ratio"),
        {"type": "prune", "depth": {"blocks": 1, "importance": "angular"}, "calibration_samples": 16},
        pure=(_measure,), text_step=True),
]  # fmt: skip

# -- quantization -----------------------------------------------------------------------------


def _quantize(config_fn: Callable[[], object], calibrate: bool = False) -> Apply:
    def apply(model, name, example):
        batches = [example(name, 16)] if calibrate else None
        quant.quantize_(model, config_fn(), calibration_data=batches)
        return model

    return apply


def _qat(model, name, example):
    quant.prepare_(model, quant.QATConfig())
    _keep_batchnorm_statistics(model)
    model.train()
    with torch.no_grad():  # the activation observers see a few batches, as during training
        for seed in range(3):
            x = example(name, 16, seed)
            model(**x) if isinstance(x, dict) else model(x)
    model.eval()
    quant.convert_(model)
    return model


def _codebook(model, name, example, activation_bits=None):
    """Shared weights: prepare (k-means), one centroid fine-tuning step at a tiny rate, convert."""
    from slimkit.batch import first_output

    quant.prepare_(model, quant.CodebookConfig(bits=6, activation_bits=activation_bits))
    x = example(name, 16, 2)
    first_output(model(**x) if isinstance(x, dict) else model(x)).float().pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-6 * p.grad.sign()
    model.zero_grad(set_to_none=True)
    quant.convert_(model)
    return model


def _quant_load(fresh: nn.Module, path: Path, _name: str) -> nn.Module:
    return quant.load_quantized(fresh, path)


def _quant_row(method, models, apply, bound, bad, step, **kw) -> Row:
    return Row("quant", method, models, apply, bound, quant.save_quantized, _quant_load, bad, step,
               pure=(_measure,), **kw)  # fmt: skip


QUANT_ROWS = [
    _quant_row("int8_dynamic", ("mlp", "cnn", "bert", "llama"), _quantize(quant.Int8DynamicConfig), 0.05,
               (lambda: quant.Int8DynamicConfig(activation_granularity="row"), "activation_granularity"),
               {"type": "quantize", "int8_dynamic": {}}),
    _quant_row("int8_dynamic", ("mlp", "cnn", "bert", "llama"),
               _quantize(lambda: quant.Int8DynamicConfig(smoothquant=True, smoothquant_alpha="auto"), True), 0.05,
               (lambda: quant.Int8DynamicConfig(smoothquant=True, smoothquant_alpha="best"), "smoothquant_alpha"),
               {"type": "quantize", "int8_dynamic": {"smoothquant": True, "smoothquant_alpha": "auto"},
                "calibration_samples": 64}, variant="smoothquant_auto"),
    _quant_row("int8_static", ("mlp", "cnn", "bert", "llama"), _quantize(quant.Int8StaticConfig, True), 0.1,
               (lambda: quant.Int8StaticConfig(activation_observer="best"), "activation_observer"),
               {"type": "quantize", "int8_static": {}, "calibration_samples": 64}),
    _quant_row("weight_only", ("mlp", "cnn", "bert", "llama"),
               _quantize(lambda: quant.WeightOnlyConfig(bits=4, group_size=32, algorithm="gptq"), True), 0.2,
               (lambda: quant.WeightOnlyConfig(bits=3), "bits"),
               {"type": "quantize", "weight_only": {"bits": 4, "group_size": 32, "algorithm": "gptq"}}),
    _quant_row("awq", ("mlp", "cnn", "bert", "llama"),
               _quantize(lambda: quant.AWQConfig(group_size=32), True), 0.2,
               (lambda: quant.AWQConfig(group_size=48), "group_size"),
               {"type": "quantize", "awq": {"group_size": 32}}),
    _quant_row("qat", ("mlp", "cnn"), _qat, 0.1, (lambda: quant.QATConfig(weight_bits=3), "weight_bits"),
               {"type": "quantize", "qat": {}, "train": {"epochs": 1, "lr": 0.0001, "progress": False}}),
    _quant_row("codebook", ("mlp", "cnn", "bert", "llama"), _codebook, 0.1,
               (lambda: quant.CodebookConfig(bits=9), "bits"),
               {"type": "quantize", "codebook": {"bits": 5}, "train": {"epochs": 1, "lr": 0.0001, "progress": False}}),
    _quant_row("codebook", ("mlp", "cnn", "bert", "llama"), functools.partial(_codebook, activation_bits=8), 0.1,
               (lambda: quant.CodebookConfig(activation_bits=4), "activation_bits"),
               {"type": "quantize", "codebook": {"bits": 5, "activation_bits": 8},
                "train": {"epochs": 1, "lr": 0.0001, "progress": False}}, variant="int8_activations"),
    _quant_row("bf16", ("mlp", "cnn", "bert", "llama"), _quantize(quant.BF16Config), 0.02,
               (lambda: quant.BF16Config(include=[]), "include"), {"type": "quantize", "bf16": {}}),
    _quant_row("mixed", ("mlp", "cnn", "bert", "llama"),
               _quantize(lambda: quant.MixedPrecisionConfig(low={"method": "int8_dynamic"}, max_high_layers=1),
                         True), 0.05,
               (lambda: quant.MixedPrecisionConfig(low={"method": "int8_dynamic"}), "max_error"),
               {"type": "quantize", "mixed": {"low": {"method": "int8_dynamic"}, "max_high_layers": 1}}),
]  # fmt: skip

# -- distillation ------------------------------------------------------------------------------


def _distill_data(x):
    if isinstance(x, dict):  # token ids: rows of a text batch, no labels (only the teacher teaches)
        return [{k: v[i] for k, v in x.items()} for i in range(len(x["input_ids"]))]
    return TensorDataset(x, torch.randint(0, 10, (len(x),)))


def _distill(student: nn.Module, teacher: nn.Module, inputs) -> distill.DistillResult:
    from slimkit.distill.api import no_label_loss

    text = isinstance(inputs, dict)
    config = distill.DistillConfig(output_loss="mse" if text else "kd", alpha=1.0 if text else 0.9)
    train = TrainConfig(epochs=1, lr=1e-6, batch_size=4, progress=False, optimizer="sgd")
    return distill.distill_(
        student, teacher, _distill_data(inputs), config, train, loss_fn=no_label_loss if text else None
    )


def _distill_apply(model, name, example):
    """The student starts as a copy of the teacher (``model``): a tiny step keeps it within the bound."""
    student = copy.deepcopy(model).train()
    _keep_batchnorm_statistics(student)
    result = _distill(student, model, example(name, 16))
    assert result.student_params == result.teacher_params and result.train.steps > 0
    return student.eval()


def _distill_teacher_untouched(model, inputs):
    """distill_ changes the student only: the teacher (the input here) must stay as it was."""
    _distill(copy.deepcopy(model), model, inputs)


def _layer_student(model, inputs):
    if isinstance(inputs, dict):  # only transformers have a block list to drop from
        distill.layer_dropped_student(model, every=2)


DISTILL_ROWS = [
    Row("distill", "distill_", ("mlp", "cnn", "bert", "llama"), _distill_apply, 0.05, save_weights, _plain_load,
        (lambda: distill.DistillConfig(temperature=0), "temperature"),
        {"type": "distill", "student": {"builtin": "digits_cnn", "kwargs": {"width": 4}},
         "distill": {"temperature": 2.0}, "train": {"epochs": 1, "lr": 0.005, "progress": False}},
        pure=(_distill_teacher_untouched, _layer_student, _measure)),
]  # fmt: skip

# -- transfer ----------------------------------------------------------------------------------


@functools.cache
def _tokenizer():
    from tests.transfer_helpers import tokenizer

    return tokenizer()


def _bundle(seed: int = 0):
    from tests.transfer_helpers import toy_bundle

    return toy_bundle(48, seed=seed)


def _finetune_config(strategy: str) -> transfer.FinetuneConfig:
    train = TrainConfig(epochs=2, lr=0.003, batch_size=16, progress=False)
    return transfer.FinetuneConfig(
        strategy=strategy, train=train, max_length=16, **STRATEGY_OPTIONS.get(strategy, {})
    )


def _finetune(strategy: str) -> Apply:
    def apply(model, name, example):
        return transfer.finetune(model, _bundle(), _finetune_config(strategy), _tokenizer()).model.eval()

    return apply


def _finetune_pure(strategy: str) -> Callable:
    def finetune_leaves_input(model, inputs):
        transfer.finetune(model, _bundle(), _finetune_config(strategy), _tokenizer())

    return finetune_leaves_input


def _task_model_load(fresh, path, _name):
    from slimkit.transfer.heads import with_head

    return load_weights(with_head(fresh, transfer.HeadConfig(), _bundle()), path).eval()


def _multitask_config() -> transfer.MultiTaskConfig:
    train = TrainConfig(epochs=2, lr=0.003, batch_size=16, progress=False)
    tasks = [transfer.TaskSpec("a"), transfer.TaskSpec("b")]
    return transfer.MultiTaskConfig(tasks=tasks, train=train, max_length=16)


def _multitask(model, name, example):
    tasks = {"a": _bundle(0), "b": _bundle(1)}
    return transfer.train_multitask(model, tasks, _multitask_config(), _tokenizer(), default="a").model.eval()


def _multitask_pure(model, inputs):
    transfer.train_multitask(model, {"a": _bundle(0), "b": _bundle(1)}, _multitask_config(), _tokenizer())


def _multitask_load(fresh, path, _name):
    from slimkit.transfer.multitask import build_multitask_model

    tasks = {"a": _bundle(0), "b": _bundle(1)}
    return load_weights(build_multitask_model(fresh, tasks, _multitask_config(), "a"), path).eval()


TEXT_COLUMNS = {"text": "text", "label": "label"}
STRATEGY_OPTIONS = {"gradual": {"unfreeze_unit": "step"}}  # the toy data gives 2 steps an epoch
TEXT_TRAIN = {"epochs": 1, "lr": 0.003, "batch_size": 16, "progress": False}
TRANSFER_ROWS = [
    Row("transfer", s, ("bert",), _finetune(s), None, save_weights, _task_model_load,
        (lambda: transfer.FinetuneConfig(strategy="bogus"), "strategy"),
        {"type": "finetune", "finetune": {"strategy": s, **STRATEGY_OPTIONS.get(s, {})},
         "train": dict(TEXT_TRAIN, epochs=2)},
        pure=(_finetune_pure(s), _measure), text_step=True)
    for s in STRATEGIES
] + [
    Row("transfer", "multitask", ("bert",), _multitask, None, save_weights, _multitask_load,
        (lambda: transfer.TaskSpec("not an identifier"), "name"),
        {"type": "multitask", "train": TEXT_TRAIN, "multitask": {"max_length": 16, "tasks": [
            {"name": "own"},
            {"name": "other", "data": {"name": "table", "path": "{csv}", "columns": TEXT_COLUMNS}}]}},
        pure=(_multitask_pure, _measure), text_step=True),
]  # fmt: skip

# -- activation replacement --------------------------------------------------------------------


def _replace_activations(config_fn: Callable[[], object]) -> Apply:
    def apply(model, name, example):
        activations.replace_activations_(model, config_fn())
        return model

    return apply


def _replaced_load(config_fn: Callable[[], object]) -> Callable:
    """The weights file is the model's own: the replacement is re-applied before loading it."""

    def load(fresh, path, _name):
        activations.replace_activations_(fresh, config_fn())
        return load_weights(fresh, path)

    return load


def _find_activations(model, inputs):
    activations.find_activations(model)


def _plan_activations(model, inputs):
    activations.plan_replacements(model, activations.ReplaceActivationsConfig(to="pwl"))


def _activation_row(to: str, models: tuple[str, ...], bound: float, **kw) -> Row:
    def config():
        return activations.ReplaceActivationsConfig(to=to)

    return Row("activations", to, models, _replace_activations(config), bound, save_weights, _replaced_load(config),
               (lambda: activations.ReplaceActivationsConfig(to=to, pwl_segments=1), "pwl_segments"),
               {"type": "replace_activations", "replace_activations": {"to": to}},
               pure=(_find_activations, _plan_activations, _measure), text_step=True, **kw)  # fmt: skip


# Bounds: the relative L2 error of the tiny models' main output, measured (relu 0.012/0.13,
# hardswish 0.0006/0.0067, pwl 0.0019/0.030 on bert/llama), with headroom.
ACTIVATION_ROWS = [
    _activation_row("relu", ("bert", "llama"), 0.2),
    _activation_row("hardswish", ("bert", "llama"), 0.02),
    _activation_row("pwl", ("bert", "llama"), 0.05),
    # tiny BERT's only tanh is its pooler's, which the compared output (last_hidden_state) does not
    # read: the bound 0 checks that nothing else changed (test_activations.py checks the pooler)
    _activation_row("hardsigmoid", ("bert",), 0.0, changes_model=False),
]  # fmt: skip

ROWS: list[Row] = [*PRUNE_ROWS, *QUANT_ROWS, *DISTILL_ROWS, *TRANSFER_ROWS, *ACTIVATION_ROWS]


def _prune_method_name(config_type: type) -> str:
    return config_type.__name__.removesuffix("Config").lower()


def registered_methods() -> set[tuple[str, str]]:
    """Every method the tables know: a new registration without a row fails the conformance test."""
    found = {("quant", name) for name in quant.method_names()}
    found |= {("prune", _prune_method_name(t)) for t in PRUNE_METHODS}
    found |= {("transfer", s) for s in STRATEGIES} | {("transfer", "multitask"), ("distill", "distill_")}
    found |= {("activations", to) for to in activations.REPLACEMENTS}
    return found


def bad_config_rows() -> list[tuple[str, Callable, str]]:
    return [(row.id, *row.bad) for row in ROWS]
