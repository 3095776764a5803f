"""Load the model a recipe names: built-in, Hugging Face folder, or the user's own factory."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from slimkit.config import one_of, require
from slimkit.errors import ModelError
from slimkit.models.builtin import BUILTIN_MODELS
from slimkit.models.causal_lm import CAUSAL_LM, default_hf_task, load_causal_lm
from slimkit.models.factory import check_factory_name, kwargs_problem, resolve_factory
from slimkit.utils.io import load_weights


@dataclass
class ModelConfig:
    """Exactly one of ``builtin``, ``hf``, ``gguf`` or ``factory`` names the model.

    ``hf_task`` left out follows the model (``causal_lm`` for SmolLM2, GGUF files and folders
    of a ``...ForCausalLM`` class, else ``embedding``); see :mod:`slimkit.models.causal_lm`.

    ``factory`` is ``package.module:function`` returning an ``nn.Module``;
    ``weights`` is a safetensors file loaded into it (never a pickle).
    """

    builtin: str | None = None
    hf: str | None = None  # a model folder, or "minilm" for the bundled all-MiniLM-L6-v2
    hf_task: Literal["embedding", "classification", "regression", "causal_lm"] | None = None
    gguf: str | None = None  # a GGUF causal LM, converted once into a cached Hugging Face folder
    num_labels: int | None = None
    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        given = [k for k in ("builtin", "hf", "gguf", "factory") if getattr(self, k)]
        require(bool(given), "builtin", "name the model with exactly one of builtin, hf, gguf or factory")
        require(len(given) == 1, given[-1], f"conflicts with {given[0]}: name only one model")
        if self.builtin:
            one_of(self.builtin, "builtin", BUILTIN_MODELS)
        if self.factory:
            check_factory_name(self.factory)  # nothing is imported here: a recipe needs consent first
        if self.weights:
            require(Path(self.weights).is_file(), "weights", f"file not found: {self.weights}")
            require(self.weights.endswith(".safetensors"), "weights", "must be a .safetensors file")
        if self.hf or self.gguf:
            self._check_hf()

    def _check_hf(self) -> None:
        from slimkit.models.causal_lm import CAUSAL_LM, check_smollm2, is_smollm2
        from slimkit.models.gguf import check_gguf_header
        from slimkit.models.hf import resolve_hf_path

        key = "gguf" if self.gguf else "hf"
        try:  # cheap checks only: a GGUF file or SmolLM2 is converted when the model loads
            if self.gguf:
                check_gguf_header(self.gguf)
            elif is_smollm2(self.hf):
                check_smollm2()
            else:
                resolve_hf_path(self.hf)
        except ModelError as err:
            require(False, key, str(err))
        if self.gguf or is_smollm2(self.hf):
            require(self.hf_task in (None, CAUSAL_LM), "hf_task", f"{key} names a causal LM: use causal_lm")


def load_model(cfg: ModelConfig, num_classes: int | None = None, input_shape: tuple | None = None):
    """Return ``(model, tokenizer_or_None)``; model in eval mode."""
    tokenizer = None
    if cfg.builtin:
        cls = BUILTIN_MODELS[cfg.builtin]
        model = cls(**builtin_kwargs(cls, cfg.kwargs, num_classes, input_shape))
    elif cfg.gguf or (cfg.hf and (cfg.hf_task or default_hf_task(cfg.hf)) == CAUSAL_LM):
        model, tokenizer = load_causal_lm(cfg.hf, cfg.gguf)
    elif cfg.hf:
        from slimkit.models.hf import load_hf

        model, tokenizer = load_hf(cfg.hf, cfg.hf_task or "embedding", cfg.num_labels or num_classes)
    else:
        fn = resolve_factory(cfg.factory)
        problem = kwargs_problem(fn, cfg.kwargs)
        if problem:
            raise ModelError(f"model.{problem[0]}: {problem[1]}")
        model = fn(**cfg.kwargs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"factory: {cfg.factory} returned {type(model).__name__}, not an nn.Module")
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model.eval(), tokenizer


def builtin_kwargs(cls, given: dict, num_classes: int | None, input_shape: tuple | None) -> dict:
    """Fill the data-dependent sizes the user did not set (classes, input channels)."""
    params = inspect.signature(cls).parameters
    unknown = [k for k in given if k not in params]
    if unknown:
        raise ModelError(f"model.kwargs.{unknown[0]}: {cls.__name__} takes {', '.join(params)}")
    kwargs = dict(given)
    if num_classes and "num_classes" in params:
        kwargs.setdefault("num_classes", num_classes)
    if input_shape and "in_channels" in params:
        kwargs.setdefault("in_channels", input_shape[0])
    if input_shape and "in_features" in params:
        size = 1
        for d in input_shape:
            size *= d
        kwargs.setdefault("in_features", size)
    return kwargs
