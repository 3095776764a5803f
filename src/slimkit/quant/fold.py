"""BatchNorm folding: a Conv2d read only by a BatchNorm2d absorbs the BatchNorm's affine map.

In eval mode ``bn(conv(x)) = conv'(x)`` with ``W' = W * g`` and ``b' = (b - mean) * g + beta``,
``g = gamma / sqrt(var + eps)`` per output channel. Quantizing ``conv'`` instead of ``conv`` puts
the BatchNorm scale inside the per-channel weight scales and drops one float op per layer, which
is what int8 runtimes do as well. Pairs are found on a recorded forward pass (the pruning tracer),
not by module order, so a conv whose output also feeds a skip connection is left alone.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.batch import default_forward
from slimkit.errors import ModelError
from slimkit.graph.trace import trace_model
from slimkit.quant.modules import FoldedBatchNorm
from slimkit.quant.plan import get_module, set_module


def conv_bn_pairs(model: nn.Module, forward: Callable[[nn.Module, Any], Any], example: Any) -> dict[str, str]:
    """``{conv name: batchnorm name}`` for every Conv2d whose output is read by one BatchNorm2d only."""
    trace = trace_model(model, forward, example)
    calls = Counter(node.name for node in trace.nodes if node.module is not None)
    pairs = {}
    for node in trace.nodes:
        if not isinstance(node.module, nn.Conv2d) or calls[node.name] != 1 or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        readers = trace.consumers.get(id(out), [])
        if len(readers) != 1 or id(out) in trace.model_outputs:
            continue
        reader = trace.nodes[readers[0]]
        if (
            isinstance(reader.module, nn.BatchNorm2d)
            and calls[reader.name] == 1
            and reader.inputs[0] is out
            and reader.module.running_mean is not None  # no running statistics: nothing fixed to fold
        ):
            pairs[node.name] = reader.name
    return pairs


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` that computes ``bn(conv(x))`` with ``bn`` in eval mode (``conv`` is untouched)."""
    if bn.num_features != conv.out_channels:
        raise ModelError(
            f"BatchNorm2d({bn.num_features}) does not match Conv2d({conv.out_channels} channels)"
        )
    # Parameters made under inference_mode could never be used with autograd again.
    with torch.inference_mode(False), torch.no_grad():
        return _folded(conv, bn)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    new = copy.deepcopy(conv)
    factor = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.float()
    shift = -bn.running_mean.float() * factor
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    bias = conv.bias.float() * factor if conv.bias is not None else torch.zeros_like(shift)
    new.weight = nn.Parameter((conv.weight.float() * factor.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
    new.bias = nn.Parameter((bias + shift).to(conv.weight.dtype))
    return new


def fold_batchnorm_(
    model: nn.Module, example: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, str]:
    """Fold every foldable BatchNorm2d into its Conv2d in place; returns ``{batchnorm: conv}``.

    The BatchNorms become :class:`FoldedBatchNorm` (identity) so that module names stay valid;
    the model computes the same function as before in eval mode (it is meant for inference).
    """

    pairs = conv_bn_pairs(model, forward or default_forward, example)
    new = {conv: folded_conv(get_module(model, conv), get_module(model, bn)) for conv, bn in pairs.items()}
    for conv, bn in pairs.items():
        set_module(model, conv, new[conv])
        set_module(model, bn, FoldedBatchNorm())
    return {bn: conv for conv, bn in pairs.items()}
