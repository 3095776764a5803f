"""Perplexity of a causal language model: one protocol, stated with every figure.

The protocol is the GPTQ papers' one: the evaluation text is joined and
tokenized once, cut into non-overlapping windows of ``seq_len`` tokens (a tail
shorter than a window is dropped), each window is run on its own (no state
carried between windows), and perplexity is ``exp`` of the mean token-level
negative log-likelihood. Unlike the papers' code, which multiplies each
window's mean loss by ``seq_len``, the mean here is exact: the sum of the NLL of
every predicted token over their count (``seq_len - 1`` per window: the first
token of a window has no context). With a ``stride`` below ``seq_len`` the
windows slide by ``stride`` tokens and each scores only its last ``stride``
tokens, with the rest as context (sliding-window evaluation, lower perplexity).

Every result carries ``seq_len``, ``stride`` and ``tokens`` (how many were scored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.batch import to_device
from slimkit.metrics.modes import eval_mode
from slimkit.metrics.task import perplexity

IGNORE_INDEX = -100
LOGITS_BUDGET = 2**26  # floats of logits per forward pass (256 MB): bounds the evaluation batch


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the NLL of every scored next token, their count). Position t predicts label t + 1;
    labels equal to ``IGNORE_INDEX`` are not scored."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored positions (the training loss)."""
    nll, count = next_token_nll(logits, labels)
    return nll / max(count, 1)


def logits_of(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs


def eval_batch_size(seq_len: int, vocab: int | None) -> int:
    """Windows per forward pass so that the logits stay within :data:`LOGITS_BUDGET` floats."""
    return max(1, LOGITS_BUDGET // (seq_len * (vocab or 50_000)))


def evaluate_perplexity(
    model: nn.Module,
    windows,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """``perplexity``, ``loss`` (mean NLL per token), ``tokens`` scored, ``seq_len``, ``stride``.

    ``windows`` is a :class:`slimkit.data.lm.TokenWindows` (items ``{"input_ids", "labels"}``).
    The model runs in eval mode under ``no_grad``; its train/eval flags are restored.
    """
    if len(windows) == 0:
        raise ValueError("evaluate_perplexity: no windows to score")
    forward = forward or (lambda m, b: m(input_ids=b["input_ids"]))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    size = batch_size or eval_batch_size(windows.seq_len, vocab)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = torch.zeros((), dtype=torch.float64), 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(windows), size):
            items = [windows[i] for i in range(start, min(start + size, len(windows)))]
            batch = to_device({k: torch.stack([it[k] for it in items]) for k in items[0]}, device)
            nll, n = next_token_nll(logits_of(forward(model, batch)), batch["labels"])
            total += nll.double().cpu()
            count += n
    loss = float(total / count)
    return {
        "perplexity": perplexity(loss),
        "loss": loss,
        "tokens": count,
        "seq_len": windows.seq_len,
        "stride": windows.stride,
    }
