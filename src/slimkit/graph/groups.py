"""Dependency analysis: which channels (and attention heads) must be removed together.

Every Linear/Conv output is a candidate *producer*. Its output space is
followed through the recorded forward pass (:mod:`slimkit.graph.propagate`):
BatchNorms and depthwise convs that act per channel become *followers*, the
layers that read it become *consumers* (they lose input columns), and spaces
that meet unit by unit (a residual add, q @ k^T, a gating product) are merged
into one group with a union-find. A group is prunable only if every space in
it is a producer output that reached nothing slimkit cannot follow; so the
hidden size of a transformer (residual adds with LayerNorm outputs and
embeddings, the pooler feeding the model output) is left alone by
construction, without any per-model exclusion list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimkit.graph.propagate import Reach, Span, layer_output, propagate
from slimkit.graph.trace import Trace

#: Attributes that store an attention module's head count (how the owner of a head group is found).
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")


@dataclass
class Group:
    """Units (channels or heads) that are kept or removed together across several layers."""

    name: str
    kind: str  # "channel" or "head"
    units: int
    producers: dict[str, Span] = field(default_factory=dict)  # layer -> span on its output features
    followers: dict[str, Span] = field(default_factory=dict)  # per-channel layer -> span on its channels
    consumers: dict[str, Span] = field(default_factory=dict)  # layer -> span on its input features
    unsafe: list[str] = field(default_factory=list)
    head_owner: str | None = None  # module whose head-count attribute changes with this group

    @property
    def prunable(self) -> bool:
        return not self.unsafe and self.units > 1

    @property
    def layers(self) -> list[str]:
        return list(self.producers) + list(self.followers) + list(self.consumers)


def producer_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        return module.out_channels
    return None


def _shared_parameters(model: nn.Module) -> set[str]:
    """Layers whose parameters are also owned by another layer (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def _reach_producer(
    trace: Trace, name: str, module: nn.Module, calls: int
) -> tuple[str, int, Span, Reach] | None:
    out = layer_output(trace, name)
    width = producer_width(module)
    if out is None or width is None:
        return None
    dim = out.dim() - 1 if isinstance(module, nn.Linear) else 1
    reach = propagate(trace, out, Span(dim))
    kind, units, span = "channel", width, Span(dim)
    if reach.unsafe and reach.split_hint and width % reach.split_hint == 0:
        # The output is viewed as (heads, head_dim): prune whole heads instead.
        r = reach.split_hint
        kind, units, span = "head", width // r, Span(dim, 0, r, r)
        reach = propagate(trace, out, span)
    if calls > 1:
        reach.unsafe.append(f"is called {calls} times in one forward")
    return kind, units, span, reach


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def _participants(trace: Trace, index: int, out_dim: int) -> set[int]:
    """Operand positions of a join node that carry the units (full extent along the units' dim)."""
    node = trace.nodes[index]
    out = node.outputs[0]
    if node.name in ("cat", "concat", "concatenate", "stack"):
        return set(range(len(node.inputs)))
    found = set()
    for pos, x in enumerate(node.inputs):
        od = out_dim - (out.dim() - x.dim())
        if x.dim() > 0 and od >= 0 and x.shape[od] == out.shape[out_dim] and out.shape[out_dim] != 1:
            found.add(pos)
    return found


def _resolve_joins(trace: Trace, reaches: dict[str, tuple]) -> _UnionFind:
    uf = _UnionFind(reaches)
    at_node: dict[int, list[str]] = {}
    for name, (_, _, _, reach) in reaches.items():
        for index in reach.joins:
            at_node.setdefault(index, []).append(name)
    for index, names in at_node.items():
        covered = set().union(*(reaches[n][3].joins[index] for n in names))
        needed = _participants(trace, index, reaches[names[0]][3].join_dims[index])
        if not needed <= covered:
            for n in names:
                reaches[n][3].unsafe.append(
                    f"is combined by {trace.nodes[index].name} with a tensor that is not a prunable layer output"
                )
        for n in names[1:]:
            uf.union(names[0], n)
    return uf


def build_groups(model: nn.Module, trace: Trace) -> list[Group]:
    """All channel and head groups of the traced model, prunable or not (``unsafe`` says why)."""
    calls: dict[str, int] = {}
    for node in trace.nodes:
        if node.module is not None:
            calls[node.name] = calls.get(node.name, 0) + 1
    modules = dict(model.named_modules())
    reaches = {}
    for name in trace.module_nodes:
        found = _reach_producer(trace, name, modules[name], calls.get(name, 0))
        if found is not None:
            reaches[name] = found
    uf = _resolve_joins(trace, reaches)
    tied = _shared_parameters(model)
    members: dict[str, list[str]] = {}
    for name in reaches:
        members.setdefault(uf.find(name), []).append(name)
    groups = [_merge(names, reaches, tied, calls) for names in members.values()]
    for g in groups:
        if g.kind == "head":
            g.head_owner = _head_owner(model, list(g.producers), g.units)
    return groups


def _merge(names: list[str], reaches: dict[str, tuple], tied: set[str], calls: dict[str, int]) -> Group:
    kinds = {reaches[n][0] for n in names}
    units = {reaches[n][1] for n in names}
    group = Group(name=names[0], kind=kinds.pop() if len(kinds) == 1 else "mixed", units=min(units))
    if len(units) > 1 or group.kind == "mixed":
        group.unsafe.append(f"couples layers of different widths/kinds: {', '.join(names)}")
    for n in names:
        _, _, span, reach = reaches[n]
        group.producers[n] = span
        group.unsafe += [f"{n}: {why}" for why in reach.unsafe]
        for f, fspan in reach.followers.items():
            if group.followers.get(f, fspan) != fspan:
                group.unsafe.append(f"{f} sees the units at two different positions")
            group.followers[f] = fspan
        for c, cspan in reach.consumers.items():
            if c in group.consumers and group.consumers[c] != cspan:
                group.unsafe.append(f"{c} reads the units at two different positions")
            group.consumers[c] = cspan
    if not group.consumers and not group.unsafe:
        # Nothing reads these units (e.g. a pooler whose output the wrapper drops): no criterion
        # can rank them and removing them saves nothing at run time.
        group.unsafe.append("its output is not used by any layer")
    for layer in group.layers:
        if layer in tied:
            group.unsafe.append(f"{layer} shares its weights with another layer")
        if calls.get(layer, 0) > 1 and layer not in group.producers:
            group.unsafe.append(f"{layer} is called {calls[layer]} times in one forward")
    group.unsafe = list(dict.fromkeys(group.unsafe))
    return group


def _head_owner(model: nn.Module, producers: list[str], heads: int) -> str | None:
    """The innermost module around the head projections that stores the head count."""
    prefix = producers[0].split(".")
    for name in producers[1:]:
        parts = name.split(".")
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    modules = dict(model.named_modules())
    for cut in range(len(prefix), -1, -1):
        owner = ".".join(prefix[:cut])
        module = modules.get(owner)
        if module is not None and any(getattr(module, a, None) == heads for a in HEAD_COUNT_ATTRS):
            return owner
    return None
