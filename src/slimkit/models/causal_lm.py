"""Causal language models: any Hugging Face ``...ForCausalLM`` folder, SmolLM2, or a GGUF file.

``hf_task: causal_lm`` loads a folder through ``AutoModelForCausalLM`` (Llama,
Qwen2, Mistral, GPT-2, OPT, ...) in float32, the reference every compressed row
is compared with. ``hf: smollm2`` names SmolLM2-135M-Instruct and ``gguf: FILE``
any GGUF checkpoint; both are converted once into a cached safetensors folder
(:mod:`slimkit.models.gguf`) and then load like any folder. When ``hf_task`` is
not given it follows the model: ``causal_lm`` for SmolLM2, GGUF files and
folders whose ``config.json`` names a causal-LM class, else ``embedding``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from torch import nn

from slimkit.errors import ConfigError, ModelError
from slimkit.models.gguf import SMOLLM2_ALIASES, check_gguf_header, converted_folder, smollm2_gguf

CAUSAL_LM = "causal_lm"
# Architecture names (config.json "architectures") of models with a next-token head.
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_smollm2(name: str | None) -> bool:
    return isinstance(name, str) and name.lower() in SMOLLM2_ALIASES


def check_smollm2() -> None:
    """The SmolLM2 GGUF file is there (nothing converted: recipe validation stays quick)."""
    check_gguf_header(smollm2_gguf())


def default_hf_task(name: str) -> str:
    """``causal_lm`` for SmolLM2 and for folders whose config names only causal-LM classes, else ``embedding``."""
    if is_smollm2(name):
        return CAUSAL_LM
    try:
        config = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "embedding"  # an alias (minilm) or a bad folder, which loading names
    archs = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(archs, list) and archs and all(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        return CAUSAL_LM
    return "embedding"


def causal_lm_folder(hf: str | None = None, gguf: str | None = None) -> Path:
    """The Hugging Face folder to load: a folder as given, or the cached conversion of a GGUF file."""
    if gguf is not None:
        return converted_folder(gguf)
    if is_smollm2(hf):
        return converted_folder(smollm2_gguf())
    from slimkit.models.hf import resolve_hf_path

    return resolve_hf_path(hf)


def load_causal_lm(hf: str | None = None, gguf: str | None = None):
    """``(model, tokenizer)``: ``AutoModelForCausalLM`` in float32, eval mode."""
    if importlib.util.find_spec("transformers") is None:
        raise ModelError("Hugging Face models need the [hf] extra: pip install 'slimkit[hf]'")
    import torch
    import transformers

    path = causal_lm_folder(hf, gguf)
    kwargs = {"local_files_only": True, "use_safetensors": True}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelError(
                f"model.hf_task: {path} holds a {_model_type(path)} model, which has no causal language-model "
                "head; causal_lm needs one such as Llama, Qwen2, Mistral, GPT-2 or OPT"
            ) from None
        raise ModelError(f"{path}: cannot load the causal language model ({_short(err)})") from None
    except (OSError, KeyError, TypeError, RuntimeError) as err:
        raise ModelError(f"{path}: cannot load the causal language model ({_short(err)})") from None
    return model.eval(), tokenizer


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model that can generate (a Hugging Face ``...ForCausalLM`` / ``LMHeadModel``)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not callable(can_generate) or config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        return bool(can_generate())
    except Exception:  # a remote-code model may raise here: not one slimkit can drive
        return False


def max_positions(model: nn.Module) -> int | None:
    """How many positions the model takes (``max_position_embeddings`` / ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_causal_lm(model: nn.Module, seq_len: int, field: str = "data.seq_len") -> None:
    """A ModelError unless ``model`` is a causal LM; a ConfigError if ``seq_len`` exceeds its positions."""
    if not is_causal_lm(model):
        raise ModelError(
            f"model: {type(model).__name__} is not a causal language model; language-modelling data needs "
            "one (a ...ForCausalLM folder with hf_task: causal_lm, hf: smollm2, or gguf: FILE)"
        )
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ConfigError(field, f"{seq_len} tokens exceed the model's {limit} positions")
