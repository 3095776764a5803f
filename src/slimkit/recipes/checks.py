"""What ``validate`` checks beyond structure and types, before any training.

* **Consent for code.** A ``factory:`` imports and runs a Python module; a
  recipe naming one is refused unless it says ``trust_code: true`` or the
  command line says ``--trust-code`` (checked before anything is imported).
* **Data.** The files are opened and their headers / first rows read: this
  learns the task (which validation metrics exist) and the input shape.
* **Model.** ``kwargs`` against the built-in model's or the factory's
  signature (the factory only with consent, never called); a built-in model
  is built (they are small) and run once on the data's input shape, a Hugging
  Face one built from its config.json on the ``meta`` device (no memory, no
  weights read), and layer patterns are matched against real layer names.
* **Monitors.** ``train.monitor`` must be a metric the step's validation
  reports for this task (``val_acuracy`` fails here, not after an epoch).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimkit.config import short_repr
from slimkit.data.preview import DataPreview, preview_data
from slimkit.data.registry import DataConfig
from slimkit.errors import ConfigError, ModelError
from slimkit.models.builtin import BUILTIN_MODELS
from slimkit.models.causal_lm import CAUSAL_LM, default_hf_task
from slimkit.models.factory import kwargs_problem, resolve_factory
from slimkit.models.loading import ModelConfig, builtin_kwargs
from slimkit.prune.select import matches
from slimkit.train import TrainConfig
from slimkit.train.config import VAL_METRICS

CONSENT = "add 'trust_code: true' to the recipe or pass --trust-code if you trust it"
# Step types after which the model's layers have other names (a new student, a head, a multi-task model).
RENAMING = ("finetune", "multitask", "distill")


def code_modules(recipe: Any) -> list[tuple[str, str]]:
    """``(field, module)`` for every model in the recipe that imports code (``factory:``), in recipe order."""
    found = [("model", recipe.model)] + [
        (f"steps[{i}].{path}", model)
        for i, step in enumerate(recipe.steps)
        for path, model in _inside(step.config, ModelConfig)
    ]
    return [(f"{field}.factory", m.factory.partition(":")[0]) for field, m in found if m.factory]


def _inside(config: Any, cls: type, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``cls`` object inside a step config (a distill teacher, a source data set), with its field path."""
    if isinstance(config, cls):
        yield path, config
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            yield from _inside(getattr(config, f.name), cls, f"{path}.{f.name}" if path else f.name)
    elif isinstance(config, (list, tuple)):
        for i, item in enumerate(config):
            yield from _inside(item, cls, f"{path}[{i}]")


def check_consent(recipe: Any, trusted: bool) -> None:
    """Refuse a recipe that would import code unless the user said so (before any import)."""
    modules = code_modules(recipe)
    if modules and not trusted:
        field, module = modules[0]
        raise ConfigError(field, f"this recipe imports and runs code from {module}; {CONSENT}")


def check_deep(recipe: Any, trusted: bool) -> None:
    """Data files, model kwargs and shape, monitors and layer patterns (see the module docstring)."""
    data = preview_data(recipe.data, "data")
    model = model_skeleton(recipe.model, data, "model", trusted)
    for i, step in enumerate(recipe.steps):
        for path, other in _inside(step.config, DataConfig):
            preview_data(other, f"steps[{i}].{path}")
        for path, teacher in _inside(step.config, ModelConfig):
            model_skeleton(teacher, data, f"steps[{i}].{path}", trusted)
        _check_monitor(step, data.task, f"steps[{i}]")
        if model is not None:
            _check_patterns(step, model, f"steps[{i}]")
            if step.type in RENAMING and getattr(step.config, "student", None) != "current":
                model = None  # later steps see other layer names: their patterns are checked when they run


def model_skeleton(cfg: ModelConfig, data: DataPreview, prefix: str, trusted: bool) -> nn.Module | None:
    """The model with its layer names (None where building it is not cheap or not allowed: factories)."""
    if cfg.factory:
        if trusted:  # the signature only: the factory is never called before the run
            _check_factory(cfg, prefix)
        return None
    if cfg.hf or cfg.gguf:
        if cfg.kwargs:
            raise ConfigError(
                f"{prefix}.kwargs", "is not used by Hugging Face models (their config.json sets them)"
            )
        task = (cfg.hf_task or default_hf_task(cfg.hf)) if cfg.hf else CAUSAL_LM
        return None if task == CAUSAL_LM else _hf_skeleton(cfg, task, data, prefix)
    return _builtin_skeleton(cfg, data, prefix)


def _check_factory(cfg: ModelConfig, prefix: str) -> None:
    try:
        fn = resolve_factory(cfg.factory)
    except ModelError as err:
        raise ConfigError(f"{prefix}.factory", str(err).removeprefix("factory: ")) from None
    problem = kwargs_problem(fn, cfg.kwargs)
    if problem:
        raise ConfigError(f"{prefix}.{problem[0]}", problem[1])


def _builtin_skeleton(cfg: ModelConfig, data: DataPreview, prefix: str) -> nn.Module | None:
    cls = BUILTIN_MODELS[cfg.builtin]
    problem = kwargs_problem(cls, cfg.kwargs)
    if problem:
        raise ConfigError(f"{prefix}.{problem[0]}", problem[1])
    kwargs = builtin_kwargs(cls, cfg.kwargs, data.num_classes, data.input_shape)
    try:
        # Built-in models are small: built on the CPU (the meta device would load torch's
        # decompositions, seconds) without touching the global RNG that the run seeds later.
        with torch.random.fork_rng(devices=[]):
            model = cls(**kwargs).eval()
        if data.input_kind == "tensor" and data.input_shape is not None:
            with torch.no_grad():
                model(torch.zeros(2, *data.input_shape))
    except (TypeError, ValueError, RuntimeError) as err:
        shape = f" on inputs of shape {data.input_shape}" if data.input_shape else ""
        raise ConfigError(
            f"{prefix}.builtin",
            f"{cfg.builtin} with {short_repr(kwargs)} fails{shape}: {short_repr(str(err))}",
        ) from None
    return model


def _hf_skeleton(cfg: ModelConfig, task: str, data: DataPreview, prefix: str) -> nn.Module:
    from slimkit.models.hf import SentenceEncoder, _require_transformers, resolve_hf_path

    transformers = _require_transformers()
    path = resolve_hf_path(cfg.hf)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            if task == "embedding":
                return SentenceEncoder(transformers.AutoModel.from_config(config))
            config.num_labels = 1 if task == "regression" else cfg.num_labels or data.num_classes or 2
            return transformers.AutoModelForSequenceClassification.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"{prefix}.hf", f"{path}: cannot build the model from config.json ({short_repr(str(err))})"
        ) from None


def allowed_monitors(step: Any, task: str | None) -> set[str] | None:
    """The ``val_*`` metrics a step's validation reports (None: known only when it runs)."""
    cfg = step.config
    if step.type == "multitask":
        found = {"val_score", "val_loss"}
        for spec in cfg.multitask.tasks:
            metrics = VAL_METRICS.get((task if spec.data is None else preview_data(spec.data).task) or "")
            if metrics is None:
                return None
            found |= {f"val_{spec.name}_{m}" for m in metrics}
        return found
    extra: tuple[str, ...] = ()
    if step.type == "finetune":  # it validates with a loss for every task, on its own data if it has some
        source = getattr(cfg.finetune, "data", None)
        task = preview_data(source).task if isinstance(source, DataConfig) else task
        extra = ("loss",)
    metrics = VAL_METRICS.get(task or "")
    return None if metrics is None else {f"val_{m}" for m in (*metrics, *extra)}


def _check_monitor(step: Any, task: str | None, prefix: str) -> None:
    train = getattr(step.config, "train", None)
    if not isinstance(train, TrainConfig) or train.monitor is None:
        return
    allowed = allowed_monitors(step, task)
    if allowed is not None and train.monitor not in allowed:
        raise ConfigError(
            f"{prefix}.train.monitor",
            f"{short_repr(train.monitor)} is not reported by this step's validation ({', '.join(sorted(allowed))})",
        )


def _check_patterns(step: Any, model: nn.Module, prefix: str) -> None:
    """Layer-name patterns of a prune / quantize / LoRA step must each match a layer of the model."""
    names = [n for n, _ in model.named_modules() if n]
    cfg = step.config
    if step.type == "prune":
        method = getattr(cfg, cfg.method)
        # depth pruning has no layer patterns
        groups = {"include": getattr(method, "include", []), "exclude": getattr(method, "exclude", [])}
        if hasattr(method, "ratios"):
            groups["ratios"] = list(method.ratios)
        _match_all(groups, names, f"{prefix}.{cfg.method}", matches)
    elif step.type == "quantize":
        quant = cfg.quant
        groups = {
            "include": list(getattr(quant, "include", [])),
            "overrides": list(getattr(quant, "overrides", {})),
        }
        _match_all(groups, names, f"{prefix}.{quant.method}", fnmatch.fnmatchcase)
    elif step.type == "replace_activations":
        from slimkit.activations import find_activations

        acts = cfg.replace_activations
        groups = {"layers": list(acts.layers or []), "exclude": list(acts.exclude or [])}
        # As the step matches them: fnmatch on the module name, a bare name also as a suffix.
        suffix = lambda n, p: fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, f"*.{p}")  # noqa: E731
        found = list(find_activations(model))
        if found:  # none at all: the step's own check says so, naming from_
            _match_all(groups, found, f"{prefix}.replace_activations", suffix, "activation")
    elif step.type == "finetune" and cfg.finetune.strategy == "lora":
        encoder = getattr(model, "encoder", None) or getattr(model, "base_model", None)
        if isinstance(encoder, nn.Module):
            linears = [n for n, m in encoder.named_modules() if type(m) is nn.Linear]
            groups = {"target_modules": cfg.finetune.lora.target_modules}
            _match_all(groups, linears, f"{prefix}.finetune.lora", fnmatch.fnmatchcase, "Linear layer")


def _match_all(
    groups: dict[str, list[str]], names: list[str], prefix: str, match, what: str = "layer"
) -> None:
    for field, patterns in groups.items():
        for i, pattern in enumerate(patterns):
            if not any(match(n, pattern) for n in names):
                where = (
                    f"{prefix}.{field}.{pattern}"
                    if field in ("overrides", "ratios")
                    else f"{prefix}.{field}[{i}]"
                )
                examples = ", ".join(names[:4]) or "none"
                raise ConfigError(
                    where, f"pattern {short_repr(pattern)} matches no {what} of the model (e.g. {examples})"
                )
