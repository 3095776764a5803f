"""How each layer type loses positions: one table of slicers, plus the attention head counts.

A slicer knows three things about its layer type: the size of each *logical*
dimension (0 = the features the layer produces or carries, 1 = the features it
reads), which tensor dimension of which parameter/buffer holds each logical
dimension, and how to write the new sizes back into the layer's attributes.
Structured pruning (:func:`slice_layer_`) and :func:`load_pruned
<slimkit.prune.sparse_io.load_pruned>` both go through this table, so a new
layer type is one :func:`register_slicer` entry. Lookup walks the module's
MRO, so subclasses of a registered type work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimkit.errors import ModelError
from slimkit.graph.groups import HEAD_COUNT_ATTRS

#: Attributes that store ``heads * head_size`` on attention modules (kept in step with the head count).
HEAD_SIZE_ATTRS = ("all_head_size", "inner_dim")
#: Grouped-query attention counts read at forward time (kept by :func:`save_pruned` too).
GQA_ATTRS = ("num_key_value_groups", "num_key_value_heads")


class Slicer:
    """Base class of one table entry; subclasses describe one layer type."""

    def sizes(self, module: nn.Module) -> dict[int, int]:
        """``{logical dim: size}`` of the dims this layer can lose positions along."""
        raise NotImplementedError

    def layout(self, module: nn.Module) -> dict[str, dict[int, int]]:
        """``{parameter or buffer name: {logical dim: tensor dim}}``."""
        raise NotImplementedError

    def set_sizes(self, module: nn.Module, sizes: dict[int, int]) -> None:
        """Write the new logical sizes into the layer's attributes (its tensors are already sliced)."""
        raise NotImplementedError


SLICERS: dict[type, Slicer] = {}


def register_slicer(module_type: type[nn.Module]) -> Callable[[type[Slicer]], type[Slicer]]:
    """Class decorator: ``@register_slicer(nn.Linear) class LinearSlicer(Slicer): ...``."""

    def register(cls: type[Slicer]) -> type[Slicer]:
        if module_type in SLICERS:
            raise ValueError(
                f"a slicer for {module_type.__name__} is already registered ({type(SLICERS[module_type]).__name__})"
            )
        SLICERS[module_type] = cls()
        return cls

    return register


def _is_named_rms_norm(module: nn.Module) -> bool:
    """RMSNorms of other libraries (transformers' ``LlamaRMSNorm``...): recognised by role, not by path."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
    )


def find_slicer(module: nn.Module) -> Slicer | None:
    for cls in type(module).__mro__:
        if cls in SLICERS:
            return SLICERS[cls]
    if _is_named_rms_norm(module):
        return SLICERS[nn.RMSNorm]
    return None


def slicer_for(module: nn.Module, name: str = "") -> Slicer:
    """The table entry for ``module``'s type; a :class:`ModelError` naming the layer if there is none."""
    slicer = find_slicer(module)
    if slicer is None:
        known = ", ".join(sorted(t.__name__ for t in SLICERS))
        raise ModelError(
            f"{name or 'layer'} ({type(module).__name__}): no slicer for this layer type "
            f"(known: {known}); register one with slimkit.prune.slicers.register_slicer"
        )
    return slicer


def _kept(size: int, removed: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def slice_layer_(module: nn.Module, remove: dict[int, set[int]], name: str = "") -> None:
    """Remove positions in place: ``remove[0]`` from the layer's outputs, ``remove[1]`` from its inputs.

    A logical dim the layer does not have (the inputs of a depthwise conv, whose
    channels are its outputs) is ignored.
    """
    slicer = slicer_for(module, name)
    sizes = slicer.sizes(module)
    keep = {d: _kept(sizes[d], set(positions)) for d, positions in remove.items() if d in sizes}
    for tname, dims in slicer.layout(module).items():
        tensor = getattr(module, tname, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        value = tensor.detach()
        for d, tdim in dims.items():
            if d in keep:
                value = value.index_select(tdim, keep[d].to(value.device))
        _replace(module, tname, tensor, value)
    slicer.set_sizes(module, {d: len(k) for d, k in keep.items()})


def _replace(module: nn.Module, tname: str, old: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        setattr(module, tname, nn.Parameter(value.clone().contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, tname, value.clone())


@register_slicer(nn.Linear)
class LinearSlicer(Slicer):
    def sizes(self, module):
        return {0: module.out_features, 1: module.in_features}

    def layout(self, module):
        return {"weight": {0: 0, 1: 1}, "bias": {0: 0}}

    def set_sizes(self, module, sizes):
        module.out_features = sizes.get(0, module.out_features)
        module.in_features = sizes.get(1, module.in_features)


@register_slicer(nn.modules.conv._ConvNd)
class ConvSlicer(Slicer):
    """Plain convs (groups == 1, transposed too) and depthwise ones (one channel per group)."""

    def _check(self, module):
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise ModelError(
                f"{type(module).__name__} with groups={module.groups}: only plain (groups=1) and "
                "depthwise convs can lose channels"
            )
        return module.groups > 1

    def sizes(self, module):
        if self._check(module):
            return {0: module.out_channels}
        return {0: module.out_channels, 1: module.in_channels}

    def layout(self, module):
        if self._check(module):
            return {"weight": {0: 0}, "bias": {0: 0}}
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)  # transposed: (in, out, *kernel)
        return {"weight": {0: out_dim, 1: in_dim}, "bias": {0: 0}}

    def set_sizes(self, module, sizes):
        if self._check(module):
            if 0 in sizes:
                module.out_channels = module.in_channels = module.groups = sizes[0]
            return
        module.out_channels = sizes.get(0, module.out_channels)
        module.in_channels = sizes.get(1, module.in_channels)


@register_slicer(nn.modules.batchnorm._BatchNorm)
class BatchNormSlicer(Slicer):
    def sizes(self, module):
        return {0: module.num_features}

    def layout(self, module):
        return {name: {0: 0} for name in ("weight", "bias", "running_mean", "running_var")}

    def set_sizes(self, module, sizes):
        module.num_features = sizes.get(0, module.num_features)


@register_slicer(nn.Embedding)
class EmbeddingSlicer(Slicer):
    """Loses embedding features (columns of the table); the vocabulary stays."""

    def sizes(self, module):
        return {0: module.embedding_dim}

    def layout(self, module):
        return {"weight": {0: 1}}

    def set_sizes(self, module, sizes):
        module.embedding_dim = sizes.get(0, module.embedding_dim)


class _FeatureNormSlicer(Slicer):
    """Norms over the last dim (LayerNorm, RMSNorm): the normalised features are the logical dim 0."""

    def sizes(self, module):
        shape = getattr(module, "normalized_shape", None)
        if shape is None:  # a library RMSNorm that only stores its weight
            return {0: module.weight.shape[0]}
        if len(shape) != 1:
            raise ModelError(
                f"{type(module).__name__} normalises over {tuple(shape)}: only norms over one "
                "feature dim can lose features"
            )
        return {0: shape[0]}

    def layout(self, module):
        return {"weight": {0: 0}, "bias": {0: 0}}

    def set_sizes(self, module, sizes):
        if 0 in sizes and getattr(module, "normalized_shape", None) is not None:
            module.normalized_shape = (sizes[0],)


@register_slicer(nn.LayerNorm)
class LayerNormSlicer(_FeatureNormSlicer):
    pass


@register_slicer(nn.RMSNorm)
class RMSNormSlicer(_FeatureNormSlicer):
    pass


# -- attention head counts: the entry for the module that owns a head group -------------------------


def update_head_counts_(owner: nn.Module, heads: int, kept_heads: int, head_size: int) -> None:
    """Set every head-count (and heads x head-size) attribute of ``owner`` that matched the old value."""
    for attr in HEAD_COUNT_ATTRS:
        if getattr(owner, attr, None) == heads:
            setattr(owner, attr, kept_heads)
    for attr in HEAD_SIZE_ATTRS:
        if getattr(owner, attr, None) == heads * head_size:
            setattr(owner, attr, kept_heads * head_size)


def head_count_attrs(module: nn.Module) -> dict[str, int]:
    """The integer head-count attributes of ``module`` (what :func:`save_pruned` stores)."""
    return {
        attr: getattr(module, attr)
        for attr in HEAD_COUNT_ATTRS + HEAD_SIZE_ATTRS + GQA_ATTRS
        if isinstance(getattr(module, attr, None), int)
    }
