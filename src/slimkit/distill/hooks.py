"""Finding layers generically and capturing their outputs with forward hooks.

Nothing here knows an architecture: the repeated blocks of a transformer are
"the longest ``nn.ModuleList`` whose children all share one type", layers are
addressed by their names in ``named_modules()`` (patterns with ``fnmatch``),
and attention maps are the 4-D second output of a module whose class name
ends in ``SelfAttention``/``Attention`` inside a block.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from slimkit.errors import ConfigError, ModelError
from slimkit.models.blocks import find_layer_list  # noqa: F401  (re-exported: distill's block finder)


def block_names(model: nn.Module) -> list[str]:
    prefix, layers = find_layer_list(model)
    return [f"{prefix}.{i}" if prefix else str(i) for i in range(len(layers))]


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block index for each student block: the last block of each of ``n_student`` equal groups.

    6 teacher blocks, 3 student blocks -> [1, 3, 5]: the student's last block is
    matched with the teacher's last, as in TinyBERT's uniform strategy.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError("layer counts must be positive")
    return [max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def default_layer_map(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Student block name -> teacher block name, uniformly spread (see :func:`uniform_layer_map`)."""
    s_names, t_names = block_names(student), block_names(teacher)
    return {s: t_names[j] for s, j in zip(s_names, uniform_layer_map(len(s_names), len(t_names)))}


def expand_names(model: nn.Module, pattern: str, role: str, path: str) -> list[str]:
    """Module names matching ``pattern`` (a name or an fnmatch pattern); error naming ``path`` if none."""
    names = [n for n, _ in model.named_modules() if n]
    if pattern in names:
        return [pattern]
    found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        close = [n for n in names if n.split(".")[-1] == pattern.split(".")[-1]][:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(path, f"the {role} has no layer matching {pattern!r}{hint}")
    return found


def resolve_layer_map(
    student: nn.Module, teacher: nn.Module, layer_map: dict[str, str] | None, path: str = "layer_map"
) -> dict[str, str]:
    """Check every named layer exists; ``None`` gives the uniform block map."""
    if layer_map is None:
        return default_layer_map(student, teacher)
    if not layer_map:
        raise ConfigError(path, "is empty; leave it out for the uniform block map")
    out = {}
    for s_name, t_name in layer_map.items():
        (s_found,) = _single(expand_names(student, s_name, "student", f"{path}.{s_name}"), s_name, path)
        (t_found,) = _single(expand_names(teacher, t_name, "teacher", f"{path}.{s_name}"), t_name, path)
        out[s_found] = t_found
    return out


def _single(found: list[str], pattern: str, path: str) -> list[str]:
    if len(found) != 1:
        raise ConfigError(f"{path}.{pattern}", f"matches {len(found)} layers; name exactly one")
    return found


def attention_modules(model: nn.Module, blocks: Iterable[str]) -> dict[str, str]:
    """Block name -> name of the self-attention module inside it (innermost ``*Attention`` class)."""
    modules = dict(model.named_modules())
    out = {}
    for block in blocks:
        inside = [
            n
            for n, m in modules.items()
            if n.startswith(block + ".") and type(m).__name__.lower().endswith("attention")
        ]
        if not inside:
            raise ModelError(f"{block}: no attention module (a class named *Attention) inside")
        # The innermost one computes the probabilities; outer wrappers add output projections.
        out[block] = max(inside, key=lambda n: n.count("."))
    return out


def first_tensor(output) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first tensor of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    for item in output:
        if isinstance(item, torch.Tensor):
            return item
    raise ModelError(f"module output of type {type(output).__name__} holds no tensor")


def attention_probs(output) -> torch.Tensor:
    """The attention probabilities a self-attention module returns next to its context vectors."""
    probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
    if isinstance(probs, torch.Tensor) and probs.dim() == 4:
        return probs
    raise ModelError(
        "the attention module returned no [B, H, S, S] probabilities; use eager attention "
        "(model.set_attn_implementation('eager'))"
    )


class Taps:
    """Forward hooks that record the outputs of named modules, one entry per forward call."""

    def __init__(
        self, model: nn.Module, names: Iterable[str], attention: Iterable[str] = (), train_only: bool = False
    ):
        # train_only: a student's validation passes (eval mode) must not pile up recorded outputs.
        self.train_only = train_only
        modules = dict(model.named_modules())
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        for name in names:
            self._handles.append(modules[name].register_forward_hook(self._recorder(name, first_tensor)))
        for name in attention:
            key = f"attn:{name}"
            self._handles.append(modules[name].register_forward_hook(self._recorder(key, attention_probs)))

    def _recorder(self, key: str, pick):
        def hook(module, inputs, output):
            if self.train_only and not module.training:
                return
            self.outputs.setdefault(key, []).append(pick(output))

        return hook

    def take(self) -> dict[str, list[torch.Tensor]]:
        """The outputs recorded since the last call; the store is emptied (no graph is kept alive)."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = {}
