"""Task heads on a pooled encoder, and the single-task model they make.

A :class:`PooledEncoder` turns any Hugging Face encoder (whatever returns
``last_hidden_state``) into one vector per text, by the mean over real tokens
or the first (``[CLS]``) token. :class:`TaskModel` adds one :class:`TaskHead`
(classification logits, or one value for regression) and returns a plain
tensor, so the task adapter, the metrics and the compression steps see an
ordinary model built of ``nn.Linear`` layers.

Every model slimkit meets exposes its encoder as ``base_model`` (the Hugging
Face convention), which is how strategies tell backbone from head without
knowing the architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.data.base import DataBundle
from slimkit.errors import ConfigError, ModelError
from slimkit.transfer.config import HeadConfig


class PooledEncoder(nn.Module):
    """``encoder(**inputs).last_hidden_state`` pooled to ``(batch, hidden)``."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    @property
    def hidden_size(self) -> int:
        return encoder_width(self.encoder)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TaskHead(nn.Module):
    """``dropout -> [Linear -> tanh -> dropout ->] Linear`` from pooled features to the task outputs."""

    def __init__(self, in_features: int, num_outputs: int, dropout: float = 0.1, hidden: int | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden is not None:
            layers += [nn.Linear(in_features, hidden), nn.Tanh(), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_outputs))
        self.net = nn.Sequential(*layers)

    @property
    def num_outputs(self) -> int:
        return self.net[-1].out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class TaskModel(nn.Module):
    """A pooled encoder with one head; ``forward`` returns logits ``(batch, num_labels)``."""

    def __init__(self, backbone: PooledEncoder, head: TaskHead, task: str = "classification"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.task = task

    @property
    def base_model(self) -> nn.Module:
        return self.backbone.encoder

    def forward(self, input_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """``inputs``: ``attention_mask`` and ``token_type_ids``, as the tokenizer gives them."""
        return self.head(self.backbone(input_ids, **inputs))


def encoder_width(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    if not isinstance(width, int):
        raise ModelError(f"{type(encoder).__name__}: cannot tell the hidden size (no config.hidden_size)")
    return width


def pooled_backbone(model: nn.Module, pooling: str = "mean") -> PooledEncoder:
    """The shared encoder of ``model``, pooled: a slimkit task model's own, or a new wrapper."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, PooledEncoder):
        return backbone
    encoder = getattr(model, "encoder", None) if _is_sentence_encoder(model) else None
    if encoder is None:
        encoder = getattr(model, "base_model", None)
    if not isinstance(encoder, nn.Module) or getattr(encoder, "config", None) is None:
        raise ModelError(
            f"{type(model).__name__} is not a Hugging Face encoder (no base_model with a config): "
            "fine-tuning with a head needs one"
        )
    return PooledEncoder(encoder, pooling)


def _is_sentence_encoder(model: nn.Module) -> bool:
    from slimkit.models.hf import SentenceEncoder

    return isinstance(model, SentenceEncoder)


def head_outputs(model: nn.Module) -> int | None:
    """How many outputs the model's task head has, or None if it has no head."""
    if isinstance(model, TaskModel):
        return model.head.num_outputs
    base = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if isinstance(base, nn.Module) and base is not model and hasattr(config, "num_labels"):
        return int(config.num_labels)  # a Hugging Face *ForSequenceClassification
    return None


def data_outputs(data: DataBundle, field: str) -> int:
    """Outputs a head needs for ``data``: its class count, or 1 for regression."""
    if data.task == "regression":
        return 1
    if data.task != "classification" or not data.num_classes:
        raise ConfigError(field, f"{data.name}: a task head needs classification or regression data")
    return int(data.num_classes)


def check_outputs(wanted: int, data: DataBundle, field: str) -> None:
    needed = data_outputs(data, field)
    if wanted != needed:
        what = "regression needs 1 output" if data.task == "regression" else f"has {needed} classes"
        raise ConfigError(field, f"the head has {wanted} outputs but {data.name} {what}")


def with_head(model: nn.Module, cfg: HeadConfig, data: DataBundle, reset: bool = False) -> nn.Module:
    """``model`` ready for ``data``'s task: its own head if it fits, else a new one on its encoder.

    The result shares the encoder's modules with ``model``; copy first to keep ``model``.
    """
    wanted = cfg.num_labels or data_outputs(data, "head.num_labels")
    check_outputs(wanted, data, "head.num_labels")
    existing = head_outputs(model)
    if existing is not None and not reset:
        if existing != wanted:
            raise ConfigError(
                "head.num_labels",
                f"the model's head has {existing} outputs but {data.name} needs {wanted}; "
                "set reset_head: true to replace it",
            )
        return model
    backbone = pooled_backbone(model, cfg.pooling)
    head = TaskHead(backbone.hidden_size, wanted, cfg.dropout, cfg.hidden)
    return TaskModel(backbone, head, data.task)


def backbone_of(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise ModelError(f"{type(model).__name__} has no separate encoder (base_model) and head")
    return base


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the encoder (head, pooler of the head): what a linear probe trains."""
    inside = {id(p) for p in backbone_of(model).parameters()}
    return [p for p in model.parameters() if id(p) not in inside]
