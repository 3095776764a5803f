"""Follow one layer's output channels through a recorded forward pass.

A channel "space" is described by :class:`Span`: along tensor dimension
``dim``, unit ``c`` (a channel, neuron or attention head) occupies the
positions ``base + c * stride + j`` for ``j < block``. Shape ops rewrite the
span (flatten multiplies it out, a view into heads divides it, cat shifts
it); element-wise ops keep it; an op that mixes units (LayerNorm over them,
a softmax across them, an unknown op) makes the space unprunable. Ops that
combine two tensors unit by unit (residual add, gating mul, q @ k^T over
heads, concat along another dim) are recorded as *joins*: the spaces meeting
there must be pruned together, or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.graph.trace import Node, Trace, flat_tensors


@dataclass(frozen=True)
class Span:
    dim: int
    base: int = 0
    stride: int = 1
    block: int = 1

    @property
    def aligned(self) -> bool:
        return self.base == 0 and self.stride == 1 and self.block == 1

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Feature positions of the given units along ``dim``."""
        offsets = torch.arange(self.block)
        return (self.base + units[:, None] * self.stride + offsets[None, :]).flatten()


@dataclass
class Reach:
    """Everything one producer's output space touches."""

    consumers: dict[str, Span] = field(default_factory=dict)  # layer -> span on its input features
    followers: dict[str, Span] = field(default_factory=dict)  # per-channel layers (BatchNorm, depthwise conv)
    joins: dict[int, set[int]] = field(default_factory=dict)  # join node -> operand positions reached
    join_dims: dict[int, int] = field(default_factory=dict)  # join node -> the units' dim in its output
    unsafe: list[str] = field(default_factory=list)
    split_hint: int | None = None  # a view split the units into blocks of this size (attention heads)


UNARY = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "dropout", "dropout_", "dropout1d", "dropout2d",
    "feature_dropout", "alpha_dropout", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "selu", "celu", "softplus", "mish", "hardswish", "hardsigmoid", "relu6", "clone", "contiguous", "to",
    "float", "half", "bfloat16", "double", "type", "type_as", "detach", "neg", "__neg__", "abs", "exp",
    "square", "sqrt", "rsqrt", "erf", "sin", "cos", "requires_grad_", "clamp", "clamp_", "clip", "sigmoid_",
    "tanh_", "nan_to_num", "log_sigmoid", "logsigmoid", "softsign", "tanhshrink", "threshold", "identity",
}  # fmt: skip
BINARY = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "pow", "__pow__", "maximum", "minimum", "where", "masked_fill",
    "masked_fill_", "addcmul", "lerp",
}  # fmt: skip
RESHAPE = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "squeeze_",
}
PERMUTE = {"transpose", "transpose_", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis"}
REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "nansum", "nanmean", "logsumexp", "prod"}
POOL = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "max_pool2d_with_indices": 2, "lp_pool2d": 2,
    "interpolate": 2, "upsample": 2, "pixel_shuffle": 2,
}  # fmt: skip
ALONG_DIM = {"softmax", "log_softmax", "normalize", "cumsum", "layer_norm", "group_norm", "rms_norm"}
MATMUL = {"matmul", "bmm", "__matmul__", "einsum_bmm", "baddbmm"}
SDPA = {"scaled_dot_product_attention"}
CONCAT = {"cat", "concat", "concatenate", "stack"}


def _ndim(t: torch.Tensor) -> int:
    return t.dim()


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def propagate(trace: Trace, start: torch.Tensor, span: Span) -> Reach:
    """Breadth-first walk from ``start`` (a producer's output) through the trace."""
    reach = Reach()
    seen: set[tuple[int, Span]] = set()
    queue = [(start, span)]
    while queue:
        tensor, span = queue.pop(0)
        if (id(tensor), span) in seen:
            continue
        seen.add((id(tensor), span))
        if id(tensor) in trace.model_outputs:
            reach.unsafe.append("reaches the model's output")
        for index in trace.consumers.get(id(tensor), []):
            node = trace.nodes[index]
            for out, out_span in _through(node, index, tensor, span, reach):
                queue.append((out, out_span))
    return reach


def _through(node: Node, index: int, t: torch.Tensor, span: Span, reach: Reach):
    """Where the span goes through ``node``; records consumers/joins/unsafety in ``reach``."""
    if node.module is not None:
        return _through_layer(node, t, span, reach)
    name = node.name
    out = node.outputs[0]
    if name == "__getitem__":
        if node.inputs[0] is not t:  # the channel values are used as positions
            return _unsafe(reach, "is used as an index")
        return _follow(out, _getitem_span(node.args[1], t, span), reach, name)
    if name in UNARY:
        if node.inputs[0] is not t:
            return _unsafe(reach, f"is a secondary argument of {name}")
        return [(out, Span(span.dim + _ndim(out) - _ndim(t), span.base, span.stride, span.block))]
    if name in BINARY or name in MATMUL or name in SDPA:
        return _through_combine(node, index, t, span, reach)
    if name in RESHAPE:
        return _follow(out, _reshape_span(t.shape, out.shape, span, reach), reach, name)
    if name in PERMUTE:
        return _follow(out, _permute_span(node, t, span), reach, name)
    if name in REDUCE:
        return _follow(out, _reduce_span(node, t, span), reach, name)
    if name in POOL:
        ok = node.inputs[0] is t and span.dim < _ndim(t) - POOL[name]
        return (
            [(o, span) for o in node.outputs[:1]] if ok else _unsafe(reach, f"is pooled across it by {name}")
        )
    if name in ALONG_DIM:
        d = _arg(node, 1, "dim", -1)
        ok = (
            isinstance(d, int)
            and _norm_dim(d, _ndim(t)) != span.dim
            and name not in ("layer_norm", "rms_norm")
        )
        return [(out, span)] if ok else _unsafe(reach, f"is mixed across units by {name}")
    if name in CONCAT:
        return _through_concat(node, index, t, span, reach)
    return _unsafe(reach, f"goes through {name}, which slimkit cannot follow")


def _unsafe(reach: Reach, reason: str) -> list:
    reach.unsafe.append(reason)
    return []


def _follow(out: torch.Tensor, span: Span | None, reach: Reach, name: str) -> list:
    if span is None:
        return _unsafe(reach, f"is reshaped across units by {name}")
    return [(out, span)]


def _through_layer(node: Node, t: torch.Tensor, span: Span, reach: Reach) -> list:
    module, name = node.module, node.name
    if not node.inputs or node.inputs[0] is not t:
        return _unsafe(reach, f"is a secondary input of {name} ({type(module).__name__})")
    if isinstance(module, nn.Linear) and span.dim == _ndim(t) - 1:
        reach.consumers[name] = span
        return []
    conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if conv and span.dim == 1 and module.groups == 1:
        reach.consumers[name] = span
        return []
    depthwise = conv and module.groups == module.in_channels == module.out_channels
    bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
    if (depthwise or bn) and span.dim == 1 and span.stride == 1 and span.block == 1:
        # Channel-wise layers keep the channel positions (an offset from a concat included).
        if reach.followers.get(name, span) != span:
            return _unsafe(reach, f"reaches {name} at two different positions")
        reach.followers[name] = span
        return [(o, span) for o in node.outputs[:1]]
    return _unsafe(reach, f"feeds {name} ({type(module).__name__}), which cannot lose inputs")


def _broadcast_dim(span_dim: int, t: torch.Tensor, other: torch.Tensor, out_ndim: int) -> int | None:
    """The other operand's dim aligned with the span, or None if it broadcasts over it."""
    d = span_dim + out_ndim - _ndim(t)  # position in the output
    od = d - (out_ndim - _ndim(other))
    if od < 0 or other.shape[od] == 1:
        return None
    return od


def _through_combine(node: Node, index: int, t: torch.Tensor, span: Span, reach: Reach) -> list:
    """Binary element-wise ops, matmul and attention: units meet unit by unit (a join) or broadcast."""
    out = node.outputs[0]
    name = node.name
    # Only batch dims (heads) pass through a matmul; the last two are contracted/rows.
    if (name in MATMUL or name in SDPA) and span.dim >= _ndim(t) - 2:
        return _unsafe(reach, f"is contracted by {name}")
    joined = False
    for pos, other in enumerate(node.inputs):
        if other is t:
            reach.joins.setdefault(index, set()).add(pos)
            continue
        if other.dim() == 0 or (name in MATMUL or name in SDPA) and other.dim() < 3:
            continue
        if _broadcast_dim(span.dim, t, other, _ndim(out)) is not None:
            joined = True
    if joined and not span.aligned:
        return _unsafe(reach, f"meets another tensor in {name} at a non-aligned position")
    if not joined:
        reach.joins.pop(index, None)
    else:
        reach.join_dims[index] = span.dim + _ndim(out) - _ndim(t)
    return [(out, Span(span.dim + _ndim(out) - _ndim(t), span.base, span.stride, span.block))]


def _through_concat(node: Node, index: int, t: torch.Tensor, span: Span, reach: Reach) -> list:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    d = _norm_dim(_arg(node, 1, "dim", 0), _ndim(t))
    out = node.outputs[0]
    if node.name == "stack":
        reach.joins.setdefault(index, set()).add(next(i for i, x in enumerate(tensors) if x is t))
        reach.join_dims[index] = span.dim + (1 if d <= span.dim else 0)
        return [(out, Span(span.dim + (1 if d <= span.dim else 0), span.base, span.stride, span.block))]
    if d != span.dim:
        reach.joins.setdefault(index, set()).add(next(i for i, x in enumerate(tensors) if x is t))
        reach.join_dims[index] = span.dim
        return [(out, span)]
    offset = 0
    for x in tensors:
        if x is t:
            break
        offset += x.shape[d]
    return [(out, Span(span.dim, span.base + offset, span.stride, span.block))]


def _reshape_span(shape_in, shape_out, span: Span, reach: Reach) -> Span | None:
    """View/reshape/flatten: merge the span's dim with later dims, or split it into blocks (heads)."""
    before = math.prod(shape_in[: span.dim])
    size = shape_in[span.dim]
    for e in range(len(shape_out)):
        if math.prod(shape_out[:e]) != before or shape_out[e] == 1 and size != 1:
            continue
        if shape_out[e] % size == 0:  # merged with the following dims (unit-major order)
            merged = shape_out[e] // size
            if math.prod(shape_in[span.dim + 1 :]) % merged == 0:
                return Span(e, span.base * merged, span.stride * merged, span.block * merged)
        elif size % shape_out[e] == 0:  # split: each output position holds `r` features
            r = size // shape_out[e]
            if span.base % r == 0 and span.stride % r == 0 and span.block % r == 0:
                return Span(e, span.base // r, span.stride // r, span.block // r)
            if span.aligned:
                reach.split_hint = r
            return None
        return None
    return None


def _permute_span(node: Node, t: torch.Tensor, span: Span) -> Span:
    n = _ndim(t)
    name = node.name
    if name == "t":
        order = list(range(n))[::-1]
    elif name == "permute":
        dims = node.args[1:] if len(node.args) > 1 else node.kwargs.get("dims")
        order = [
            _norm_dim(d, n)
            for d in (dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims)
        ]
    elif name in ("movedim", "moveaxis"):
        src, dst = _norm_dim(_arg(node, 1, "source"), n), _norm_dim(_arg(node, 2, "destination"), n)
        order = [d for d in range(n) if d != src]
        order.insert(dst, src)
    else:
        a, b = _norm_dim(_arg(node, 1, "dim0"), n), _norm_dim(_arg(node, 2, "dim1"), n)
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    return Span(order.index(span.dim), span.base, span.stride, span.block)


def _reduce_span(node: Node, t: torch.Tensor, span: Span) -> Span | None:
    dims = _arg(node, 1, "dim")
    if dims is None:
        return None
    n = _ndim(t)
    dims = [_norm_dim(d, n) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if span.dim in dims:
        return None
    keepdim = _arg(node, 2, "keepdim", False)
    shift = 0 if keepdim else sum(1 for d in dims if d < span.dim)
    return Span(span.dim - shift, span.base, span.stride, span.block)


def _getitem_span(index, t: torch.Tensor, span: Span) -> Span | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (torch.Tensor, list)) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = _ndim(t) - (len(items) - 1 - sum(1 for i in items if i is None))
        items = items[:at] + [slice(None)] * fill + items[at + 1 :]
    new_dim, src = 0, 0
    for item in items:
        if item is None:
            new_dim += 1
            continue
        if src == span.dim:
            return Span(new_dim, span.base, span.stride, span.block) if item == slice(None) else None
        if not isinstance(item, int):
            new_dim += 1
        src += 1
    return Span(new_dim + span.dim - src, span.base, span.stride, span.block)


def layer_output(trace: Trace, name: str) -> torch.Tensor | None:
    index = trace.module_nodes.get(name)
    if index is None or not trace.nodes[index].outputs:
        return None
    return trace.nodes[index].outputs[0]


def tensors_of(node: Node) -> list[torch.Tensor]:
    return flat_tensors(node.args) + flat_tensors(node.kwargs)
