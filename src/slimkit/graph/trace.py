"""Record which tensors flow where in one forward pass (works on any model, HF included).

torch.fx cannot trace many real models (data-dependent Python, HF kwargs), so
the dependency analysis watches an ordinary forward instead: a
``TorchFunctionMode`` logs every top-level torch call, and forward hooks on
"leaf" layers (Linear, Conv, norms, embeddings, anything else with its own
parameters) log each layer call as one node, hiding the ops inside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: Layers recorded as single nodes even though they are built from torch ops.
LEAF_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.RNNBase,
)


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclasses (HF ModelOutput is a dict)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in flat_tensors(item)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in flat_tensors(item)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in flat_tensors(getattr(obj, f.name, None))]
    return []


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name


@dataclass
class Node:
    """One recorded call: a torch op (``module is None``) or a whole leaf layer."""

    name: str  # op name, or the layer's dotted name
    func: Any
    module: nn.Module | None
    args: tuple
    kwargs: dict
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


@dataclass
class Trace:
    nodes: list[Node] = field(default_factory=list)
    consumers: dict[int, list[int]] = field(default_factory=dict)  # tensor id -> node indices
    model_outputs: set[int] = field(default_factory=set)
    module_nodes: dict[str, int] = field(default_factory=dict)  # layer name -> its (first) node
    keep_alive: list[torch.Tensor] = field(default_factory=list)  # ids stay unique while tensors live

    def add(self, node: Node) -> None:
        index = len(self.nodes)
        self.nodes.append(node)
        for t in node.inputs:
            uses = self.consumers.setdefault(id(t), [])
            if index not in uses:
                uses.append(index)
        self.keep_alive.extend(node.inputs + node.outputs)
        if node.module is not None:
            self.module_nodes.setdefault(node.name, index)


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace
        self.depth = 0  # > 0 while inside a leaf layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outputs = flat_tensors(out)
            inputs = flat_tensors(args) + flat_tensors(kwargs)
            if outputs and inputs:
                self.trace.add(Node(op_name(func), func, None, args, kwargs, inputs, outputs))
        return out


def is_leaf(module: nn.Module) -> bool:
    own_params = any(p is not None for p in module._parameters.values())
    return isinstance(module, LEAF_TYPES) or (own_params and not any(True for _ in module.children()))


def trace_model(model: nn.Module, forward, example: Any) -> Trace:
    """Run ``forward(model, example)`` once (no grad, eval mode restored after) and record it."""
    trace = Trace()
    recorder = _Recorder(trace)
    handles = []
    for name, module in model.named_modules():
        if name and is_leaf(module):
            handles.append(module.register_forward_pre_hook(_enter(recorder), with_kwargs=True))
            handles.append(module.register_forward_hook(_leave(recorder, name, module), with_kwargs=True))
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), recorder:
            out = forward(model, example)
        trace.model_outputs = {id(t) for t in flat_tensors(out)}
        trace.keep_alive.extend(flat_tensors(out))
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training.items():
            m.training = mode
    return trace


def _enter(recorder: _Recorder):
    def hook(module, args, kwargs):
        recorder.depth += 1

    return hook


def _leave(recorder: _Recorder, name: str, module: nn.Module):
    def hook(mod, args, kwargs, output):
        recorder.depth -= 1
        if recorder.depth == 0:
            inputs = flat_tensors(args) + flat_tensors(kwargs)
            recorder.trace.add(Node(name, None, module, args, kwargs, inputs, flat_tensors(output)))

    return hook
