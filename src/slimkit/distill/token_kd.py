"""Token-level logit distillation for causal language models.

A causal LM's logits are ``batch x tokens x vocab`` (8 x 512 x 49152 floats = 805 MB for
SmolLM2), so the usual ``log_softmax`` of student and teacher, their product and the autograd
copies of each would hold several such tensors at once. Here the KL is computed over chunks of
scored positions, and its gradient (``T * (q - p) / n`` for every scored row, zero elsewhere) is
recomputed chunk by chunk in the backward pass: beyond the two models' logits, only one gradient
tensor of their size is ever made, and that one the lm_head's backward needs anyway.

Scored positions follow the next-token loss (:func:`slimkit.metrics.lm.next_token_nll`): the
logits at position ``t`` predict ``labels[t + 1]``, and a label of ``-100`` is not scored, so the
KL is taken exactly where the cross-entropy is.

The teacher may instead be given as its top-``k`` log-probabilities (what a cache can hold:
``k`` values and indices per token instead of the vocabulary): the KL is then over ``k + 1``
buckets, the teacher's ``k`` most likely tokens and one bucket for the rest of the vocabulary.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from slimkit.distill.losses import _check_temperature, check_same_shape
from slimkit.errors import ConfigError

IGNORE_INDEX = -100
CHUNK_ROWS = 512  # scored positions per chunk: 512 x 49152 float32 = 100 MB per temporary


def scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``batch * tokens``) of the positions whose next token is scored."""
    if labels.dim() != 2:
        raise ConfigError("labels", f"must be [batch, tokens], got shape {tuple(labels.shape)}")
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored.reshape(-1).nonzero().squeeze(1)


class _TokenKL(torch.autograd.Function):
    """``T^2 * mean over rows of KL(softmax(t / T) || softmax(s / T))`` with a chunked backward."""

    @staticmethod
    def forward(ctx, student, teacher, rows, temperature, chunk):
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for i in range(0, rows.numel(), chunk):
            log_q, log_p = _log_probs(student, teacher, rows[i : i + chunk], temperature)
            total += (log_p.exp() * (log_p - log_q)).sum().double()
        ctx.save_for_backward(student, teacher, rows)
        ctx.temperature, ctx.chunk = temperature, chunk
        n = max(rows.numel(), 1)
        return (total * temperature**2 / n).float()

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, rows = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device).view(
            -1, student.shape[-1]
        )
        scale = grad_out.float() * temperature / max(rows.numel(), 1)  # d(T^2 KL / n)/ds = T (q - p) / n
        for i in range(0, rows.numel(), chunk):
            part = rows[i : i + chunk]
            log_q, log_p = _log_probs(student, teacher, part, temperature)
            grad[part] = ((log_q.exp() - log_p.exp()) * scale).to(grad.dtype)
        return grad.view_as(student), None, None, None, None


def _log_probs(student, teacher, part, temperature):
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab)[part].float() / temperature
    t = teacher.reshape(-1, vocab)[part].float() / temperature
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """``T**2 * KL(teacher || student)`` at temperature ``T``, averaged over the scored positions.

    ``student_logits``/``teacher_logits``: ``[batch, tokens, vocab]``; ``labels``: ``[batch, tokens]``
    (``-100`` = not scored). The teacher gets no gradient.
    """
    _check(student_logits, labels, temperature)
    check_same_shape(student_logits, teacher_logits, "logits")
    rows = scored_rows(labels.to(student_logits.device))
    return _TokenKL.apply(student_logits, teacher_logits.detach(), rows, float(temperature), int(chunk))


def teacher_top_k(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, chunk: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` largest log-probabilities at ``temperature`` per position, and their token ids.

    Values come as float16 and ids as int32 (what a cache stores: 6 bytes per kept entry).
    """
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k < vocab:
        raise ConfigError("top_k", f"must be in [1, vocab size {vocab}), got {k}")
    flat = teacher_logits.detach().reshape(-1, vocab)
    values, ids = [], []
    for i in range(0, flat.shape[0], chunk):
        log_p = F.log_softmax(flat[i : i + chunk].float() / temperature, dim=-1)
        top = log_p.topk(k, dim=-1)
        values.append(top.values.half())
        ids.append(top.indices.int())
    shape = (*teacher_logits.shape[:-1], k)
    return torch.cat(values).view(shape), torch.cat(ids).view(shape)


def top_k_kd_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_ids: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """:func:`token_kd_loss` against the teacher's top-``k`` (from :func:`teacher_top_k`, at the same
    temperature): KL over the ``k`` kept tokens plus one bucket holding the rest of the vocabulary."""
    _check(student_logits, labels, temperature)
    if teacher_ids.shape != teacher_log_probs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ConfigError(
            "logits",
            f"teacher top-k {tuple(teacher_ids.shape)} does not fit student logits {tuple(student_logits.shape)}",
        )
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    rows = scored_rows(labels.to(student_logits.device))
    s_flat = student_logits.reshape(-1, vocab)
    t_vals, t_ids = teacher_log_probs.reshape(-1, k), teacher_ids.reshape(-1, k).long()
    total = student_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, rows.numel(), chunk):
        part = rows[i : i + chunk]
        log_q = F.log_softmax(s_flat[part].float() / temperature, dim=-1)
        ids = t_ids[part].to(log_q.device)
        log_q_top = log_q.gather(1, ids)
        # the rest bucket's log-mass: logsumexp over the tokens outside the teacher's top-k
        log_q_rest = log_q.scatter(1, ids, float("-inf")).logsumexp(dim=-1)
        log_p_top = t_vals[part].float().to(log_q.device)
        p_rest = (1 - log_p_top.exp().sum(-1)).clamp_min(0)
        kl_top = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
        kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - log_q_rest), 0.0)
        total = total + (kl_top + kl_rest).sum()
    return total * temperature**2 / max(rows.numel(), 1)


def _check(student_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    _check_temperature(temperature)
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ConfigError(
            "labels",
            f"token distillation needs [batch, tokens] labels for [batch, tokens, vocab] logits; "
            f"got {tuple(labels.shape)} for {tuple(student_logits.shape)}",
        )
