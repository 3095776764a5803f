"""Distillation losses: plain functions of student and teacher tensors.

They hold no state and run no model, so the training core's one loop can
compose them (through :class:`slimkit.distill.DistillationCallback`) and tests
can check them against hand-computed values.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.errors import ConfigError

MATCH_LOSSES = ("mse", "cosine")


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ConfigError("temperature", f"must be > 0, got {temperature!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): ``T**2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.

    The ``T**2`` factor keeps the gradient of the soft term on the same scale as
    the hard-label term whatever the temperature, so ``alpha`` means the same
    thing at T=2 and T=20.
    """
    _check_temperature(temperature)
    check_same_shape(student_logits, teacher_logits, "logits")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def soft_hard_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * kd_loss + (1 - alpha) * cross_entropy(student, labels)``."""
    hard = F.cross_entropy(student_logits, labels)
    return alpha * kd_loss(student_logits, teacher_logits, temperature) + (1 - alpha) * hard


def match_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between two same-shaped feature tensors.

    ``mse`` is the mean squared error; ``cosine`` is ``1 - cos`` along the last
    axis (for [B, S, D] hidden states, per token; for [B, D] embeddings, per
    sample), averaged.
    """
    if kind not in MATCH_LOSSES:
        raise ConfigError("loss", f"must be one of {', '.join(MATCH_LOSSES)}; got {kind!r}")
    check_same_shape(student, teacher, "features")
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def masked_match_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, kind: str = "mse"
) -> torch.Tensor:
    """:func:`match_loss` over token states ``[B, S, D]``, ignoring padded tokens where ``mask`` is 0."""
    if mask is None or student.dim() != 3 or mask.shape != student.shape[:2]:
        return match_loss(student, teacher, kind)
    keep = mask.bool()
    return match_loss(student[keep], teacher[keep], kind)


def attention_loss(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL between teacher and student attention distributions ``[B, H, S, S]`` (MiniLM-style).

    Rows of padded query tokens are ignored. Head counts must agree; average
    the heads first when they differ.
    """
    if student_attn.shape[1] != teacher_attn.shape[1]:
        student_attn = student_attn.mean(1, keepdim=True)
        teacher_attn = teacher_attn.mean(1, keepdim=True)
    check_same_shape(student_attn, teacher_attn, "attention maps")
    eps = 1e-8
    kl = teacher_attn * (torch.log(teacher_attn + eps) - torch.log(student_attn + eps))
    per_row = kl.sum(-1)  # [B, H, S]
    if mask is None:
        return per_row.mean()
    rows = mask[:, None, :].to(per_row.dtype).expand_as(per_row)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ConfigError(
            what,
            f"student shape {tuple(student.shape)} does not match teacher shape {tuple(teacher.shape)}",
        )


def projection(student_width: int, teacher_width: int, conv: bool = False) -> nn.Module:
    """A learned map from the student's width to the teacher's (1x1 conv for feature maps)."""
    if conv:
        return nn.Conv2d(student_width, teacher_width, kernel_size=1)
    return nn.Linear(student_width, teacher_width)
