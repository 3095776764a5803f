"""The one batch convention: how a batch becomes model inputs and targets.

Every part of slimkit (the training loop, calibration, importance scoring,
metrics, distillation) reads batches through these functions, so a batch means
the same thing everywhere:

* a tensor ``x``: inputs only (``model(x)``), no targets;
* a tuple or list ``(x, y, ...)``: ``model(x)``, targets ``y``;
* a dict (Hugging Face style): ``model(**inputs)`` where inputs are every key but
  the targets (``labels``, ``label``, ``scores``), which never reach the model, and
  the second sentence of a pair (keys prefixed ``pair_``, see :func:`pair_inputs`).

A technique that needs another layout takes a ``forward(model, batch)`` with the
same meaning as :func:`default_forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TARGET_KEYS = ("labels", "label", "scores")
PAIR_PREFIX = "pair_"
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer gives a model
Forward = Callable[[nn.Module, Any], Any]


def model_inputs(batch: Any) -> Any:
    """What the model is called with: a dict of keyword inputs, or one input tensor."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in TARGET_KEYS and not k.startswith(PAIR_PREFIX)}
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def pair_inputs(batch: dict) -> dict:
    """The second sentence of a sentence-pair batch, as keyword inputs (``pair_input_ids`` -> ``input_ids``)."""
    return {k[len(PAIR_PREFIX) :]: v for k, v in batch.items() if k.startswith(PAIR_PREFIX)}


def targets(batch: Any) -> Any:
    """The batch's targets, or ``None`` for inputs-only batches."""
    if isinstance(batch, dict):
        return next((batch[k] for k in TARGET_KEYS if k in batch), None)
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return batch[1]
    return None


def text_inputs(encoded: Any) -> dict:
    """The tokenizer outputs a text model takes (a tokenizer may add others, e.g. offsets)."""
    return {k: encoded[k] for k in TEXT_INPUT_KEYS if k in encoded}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on what :func:`model_inputs` returned."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch by the convention above; returns the model's outputs."""
    return call_model(model, model_inputs(batch))


def first_output(outputs: Any) -> torch.Tensor:
    """The main tensor of a model's outputs (``last_hidden_state`` / ``logits`` / a plain tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "values") and hasattr(outputs, "keys"):
        return next(iter(outputs.values()))
    return outputs[0]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_len(batch: Any) -> int:
    """Number of samples in a batch."""
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return len(batch[0])
    return len(batch)


def first_row(batch: Any) -> Any:
    """The first sample of a batch, still a batch (tensors, or dicts/tuples of them)."""
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, dict):
        return {k: first_row(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(first_row(v) for v in batch)
    return batch


def describe_batch(batch: Any) -> str:
    """A batch's shapes in words, for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return f"input of shape {tuple(batch[0].shape)}"
    return type(batch).__name__
