"""Stop training at the first NaN or infinite loss, gradient or weight, naming where it happened.

The checks cost one fused norm over the gradients and one device sync per step
(the loop reads the loss value anyway); the slow per-parameter search runs only
after a check failed, to name the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimkit.errors import NonFiniteError

HINT = "lower train.lr or set train.grad_clip, and check the data for extreme values"


def total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together (NaN or inf if any element is), in one fused call."""
    tensors = [t.detach() for t in tensors if t.is_floating_point()]  # integers are always finite
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


def check_step(
    model: nn.Module,
    loss: torch.Tensor,
    total: torch.Tensor,
    where: str | Callable[[], str],
    grad_clip: float | None = None,
) -> None:
    """After backward, before the optimizer step: refuse a non-finite loss or gradient.

    ``loss`` is the task loss and ``total`` the loss the gradients came from (plus any
    penalty); ``where`` (or a function giving it, called only on failure) names the batch.
    With ``grad_clip`` the gradients are clipped here, reusing clipping's norm.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None:
        norm = nn.utils.clip_grad_norm_(params, grad_clip) if params else torch.zeros(())
    else:
        norm = total_norm(p.grad for p in params)
    values = torch.stack([total.detach().float().reshape(()), norm.detach().float().to(total.device)])
    if bool(torch.isfinite(values).all()):
        return
    where = where() if callable(where) else where
    if not bool(torch.isfinite(total.detach()).all()):
        _bad_loss(model, loss, total, where)
    name, value = first_nonfinite(model, grads=True)
    if name is not None:  # else only the norm overflowed: every gradient is a finite number
        raise NonFiniteError(f"the gradient of {name!r} is {value}; {HINT}", where, layer=name)


def _bad_loss(model: nn.Module, loss: torch.Tensor, total: torch.Tensor, where: str) -> None:
    name, value = first_nonfinite(model, grads=False)
    if name is not None:
        raise NonFiniteError(f"the loss is {_show(loss)}: the weights of {name!r} are {value}", where, name)
    if bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"the regularization penalty is {_show(total)}; lower train.l1/l2", where)
    raise NonFiniteError(f"the loss is {_show(loss)}; {HINT}", where)


def check_weights(model: nn.Module, where: str) -> None:
    """Refuse weights that became non-finite (an optimizer step can overflow with finite gradients)."""
    if bool(torch.isfinite(total_norm(t for _, t in _weights(model)))):
        return
    name, value = first_nonfinite(model, grads=False)
    if name is not None:
        raise NonFiniteError(f"the weights of {name!r} became {value}; {HINT}", where, layer=name)


def _weights(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Parameters and normalization statistics (a running variance overflows as a weight does).

    Other buffers are left alone: an observer's min/max legitimately start at +/-inf.
    """
    yield from model.named_parameters()
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            yield name, buf


def first_nonfinite(model: nn.Module, grads: bool) -> tuple[str | None, str]:
    """The first parameter's gradient (``grads``) or weight/buffer holding a NaN or inf, and which."""
    named = model.named_parameters() if grads else _weights(model)
    for name, p in named:
        t = p.grad if grads else p
        if t is None or not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        return name, "nan" if bool(torch.isnan(t).any()) else "inf"
    return None, ""


def _show(t: torch.Tensor) -> str:
    t = t.detach()
    return str(t.item()) if t.numel() == 1 else f"non-finite ({t.shape})"
