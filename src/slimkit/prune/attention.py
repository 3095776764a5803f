"""Grouped-query attention (GQA) pruning: whole key/value groups, or query heads evenly in every group.

The traced graph cannot prune a GQA attention itself: the key/value heads are repeated for several
query heads and rotary embeddings cut every head in halves, so its head group is unsafe. The
attention modules of the Llama family (Llama, Qwen2, Mistral...) are recognised by role instead:
Linear ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and the ``head_dim``/``num_key_value_groups``
attributes transformers reads at forward time. Query head ``i`` uses key/value head ``i // g``
(``g`` = query heads per group, transformers' ``repeat_kv``), so

- ``gqa: groups`` removes key/value head ``j`` with its ``g`` query heads (rows of q/k/v, columns
  of o): ``g`` is unchanged;
- ``gqa: heads`` removes the same number of query heads from every group: ``g`` shrinks.

Either way the result is a valid GQA with the same ``head_dim``, and rotary embeddings (per head,
over ``head_dim``) are untouched. The units are ordinary :class:`Group` objects, so every criterion
of the importance registry scores them (a key/value group's score covers all its weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.graph.groups import Group
from slimkit.graph.propagate import Span

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class GQAttention:
    """One attention module and its head counts as found before pruning."""

    name: str
    module: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads

    def layer(self, proj: str) -> str:
        return f"{self.name}.{proj}" if self.name else proj


def as_gqa(name: str, module: nn.Module) -> GQAttention | None:
    """``module`` as a GQA attention (q/k/v/o Linear projections, ``head_dim``), else None."""
    projs = [getattr(module, p, None) for p in PROJECTIONS]
    head_dim = getattr(module, "head_dim", None)
    if not all(isinstance(p, nn.Linear) for p in projs) or not isinstance(head_dim, int) or head_dim < 1:
        return None
    if not isinstance(getattr(module, "num_key_value_groups", None), int):
        return None
    heads, kv_heads = projs[0].out_features // head_dim, projs[1].out_features // head_dim
    if kv_heads < 1 or heads % kv_heads:
        return None
    return GQAttention(name, module, heads, kv_heads, head_dim)


def find_gqa(model: nn.Module) -> list[GQAttention]:
    return [a for n, m in model.named_modules() if (a := as_gqa(n, m)) is not None]


def gqa_group(att: GQAttention, mode: str) -> Group:
    """The attention's prunable units: key/value groups (``groups``) or query heads (``heads``)."""
    hd, q = att.head_dim, att.per_group * att.head_dim
    if mode == "groups":
        producers = {att.layer("q_proj"): Span(2, 0, q, q)}
        producers |= {att.layer(p): Span(2, 0, hd, hd) for p in ("k_proj", "v_proj")}
        return Group(
            att.name, "kv_group", att.kv_heads, producers, {}, {att.layer("o_proj"): Span(2, 0, q, q)}
        )
    span = Span(2, 0, hd, hd)
    return Group(att.name, "q_head", att.heads, {att.layer("q_proj"): span}, {}, {att.layer("o_proj"): span})


def removed_per_unit(att: GQAttention, mode: str, ratio: float) -> int:
    """Key/value groups removed (``groups``), or query heads removed from every group (``heads``)."""
    units = att.kv_heads if mode == "groups" else att.per_group
    return math.floor(ratio * units + 1e-9)


def check_gqa(atts: list[GQAttention], mode: str, ratios: dict[str, float]) -> None:
    """Every attention stays a valid GQA and loses something; a ConfigError naming the field otherwise."""
    if not atts:
        raise ConfigError("gqa", "no grouped-query attention (q/k/v/o projections with head_dim) found")
    for att in atts:
        ratio = ratios[att.name]
        if mode == "groups" and att.kv_heads == 1:
            raise ConfigError(
                "gqa", f"{att.name} has one key/value group: none can be removed (use gqa: heads)"
            )
        if mode == "heads" and att.per_group == 1:
            raise ConfigError(
                "gqa", f"{att.name} has one query head per key/value group: use gqa: groups to remove heads"
            )
        units = att.kv_heads if mode == "groups" else att.per_group
        what = "key/value groups" if mode == "groups" else "query heads per group"
        if removed_per_unit(att, mode, ratio) == 0:
            raise ConfigError(
                "head_ratio",
                f"{ratio} x {units} {what} of {att.name} removes none: give a ratio of at least {1 / units:.3g}",
            )


def keep_units(att: GQAttention, mode: str, scores: torch.Tensor, ratio: float) -> list[int]:
    """Sorted kept units: the best key/value groups, or the best query heads of every group."""
    n = removed_per_unit(att, mode, ratio)
    if mode == "groups":
        order = torch.argsort(scores, descending=True, stable=True)
        return sorted(order[: att.kv_heads - n].tolist())
    g, kept = att.per_group, []
    for j in range(att.kv_heads):
        order = torch.argsort(scores[j * g : (j + 1) * g], descending=True, stable=True)
        kept += sorted(j * g + i for i in order[: g - n].tolist())
    return kept


def set_head_counts_(att: GQAttention, mode: str, kept: int) -> None:
    """The module attributes transformers reads (``num_key_value_groups``; older ones' head counts)."""
    heads = kept * att.per_group if mode == "groups" else kept
    kv_heads = kept if mode == "groups" else att.kv_heads
    m = att.module
    m.num_key_value_groups = heads // kv_heads
    for attr, old, new in (
        ("num_heads", att.heads, heads),
        ("num_attention_heads", att.heads, heads),
        ("num_key_value_heads", att.kv_heads, kv_heads),
    ):
        if getattr(m, attr, None) == old:
            setattr(m, attr, new)
