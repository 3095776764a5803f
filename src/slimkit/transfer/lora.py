"""Low-rank adapters (LoRA, Hu et al. 2021) through the ``peft`` library, and merging them back.

Targets are chosen by fnmatch patterns over the encoder's ``nn.Linear`` names
(``*.query``, ``*attention*``), resolved here to exact names so that a
pattern that matches nothing is an error naming it, before any layer is
replaced. ``peft`` does the injection (its ``inject_adapter_in_model`` works
on any module, with no wrapper class); :func:`merge_lora_` folds each
adapter into its base weight (``W + scale * B @ A``) and puts the plain
``nn.Linear`` back, so pruning and quantization see an ordinary model.
"""

from __future__ import annotations

import fnmatch
import importlib.util

from torch import nn

from slimkit.errors import ConfigError, ModelError
from slimkit.transfer.config import LoraSpec
from slimkit.transfer.heads import backbone_of


def _require_peft():
    if importlib.util.find_spec("peft") is None:
        raise ModelError("LoRA needs the peft package: pip install 'slimkit[hf]'")
    import peft

    return peft


def lora_targets(model: nn.Module, spec: LoraSpec, field: str = "lora.target_modules") -> list[str]:
    """Names (inside the encoder) of the Linear layers the patterns match; every pattern must match one."""
    linears = [n for n, m in backbone_of(model).named_modules() if type(m) is nn.Linear]
    chosen: list[str] = []
    for i, pattern in enumerate(spec.target_modules):
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(linears[:4]) or "none"
            raise ConfigError(
                f"{field}[{i}]",
                f"pattern {pattern!r} matches no Linear layer of the encoder (e.g. {examples})",
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def add_lora_(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Put adapters on the matched encoder layers; only adapters and the head stay trainable.

    Returns the adapted layer names.
    """
    targets = lora_targets(model, spec)
    peft = _require_peft()
    config = peft.LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none"
    )
    encoder = backbone_of(model)
    head_flags = {id(p): p.requires_grad for p in model.parameters()}
    peft.inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in name)
    inside = {id(p) for p in encoder.parameters()}
    for param in model.parameters():
        if id(param) not in inside:
            param.requires_grad_(head_flags.get(id(param), True))
    return targets


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: nn.Module) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its base layer and put the base layer back; returns how many were merged."""
    adapted = [(n, m) for n, m in model.named_modules() if _is_lora_layer(m)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return len(adapted)


def lora_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
