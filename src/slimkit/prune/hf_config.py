"""Keep a Hugging Face model's config in step with the shapes pruning left, where it can say them.

A Hugging Face config holds one ``intermediate_size``, one ``num_attention_heads`` and one
``num_key_value_heads`` for every block. When every decoder block has the same new size, the config
gets it (and ``AutoModelForCausalLM.from_pretrained`` rebuilds the pruned model from its folder);
when blocks differ (global ranking, per-layer ratios), the config keeps its old value, the field is
reported as non-uniform, and the model is stored in slimkit's pruned format instead.
"""

from __future__ import annotations

from torch import nn

from slimkit.errors import ModelError
from slimkit.models.blocks import find_layer_list
from slimkit.prune.attention import as_gqa


def text_config(model: nn.Module):
    """The config holding the decoder's sizes (a multimodal config's text part), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _mlp_width(module: nn.Module) -> int | None:
    """The hidden width of a gated (SwiGLU) or plain MLP with a ``down_proj``."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "up_proj", None) or getattr(module, "gate_proj", None)
    if isinstance(down, nn.Linear) and isinstance(up, nn.Linear):
        return down.in_features
    return None


def block_sizes(model: nn.Module) -> dict[str, list[int]]:
    """``{config field: its value in each block}`` for the fields that width pruning changes."""
    try:
        _, blocks = find_layer_list(model)
    except ModelError:
        return {}
    sizes: dict[str, list[int]] = {}
    for block in blocks:
        for name, module in block.named_modules():
            att = as_gqa(name, module)
            if att is not None:
                sizes.setdefault("num_attention_heads", []).append(att.heads)
                sizes.setdefault("num_key_value_heads", []).append(att.kv_heads)
                sizes.setdefault("head_dim", []).append(att.head_dim)
            width = _mlp_width(module)
            if width is not None:
                sizes.setdefault("intermediate_size", []).append(width)
    return sizes


def sync_config_(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Write the blocks' sizes into the config; ``({field: new value}, [non-uniform fields])``."""
    config = text_config(model)
    if config is None:
        return {}, []
    changed, uneven = {}, []
    for field, values in block_sizes(model).items():
        if field == "head_dim" and "num_attention_heads" not in changed:
            continue
        if not hasattr(config, field) and field != "head_dim":
            continue
        if len(set(values)) > 1:
            uneven.append(field)
        elif getattr(config, field, None) != values[0]:
            # head_dim is written even where the config derives it (hidden_size // heads), since the
            # head count changed but the head size did not
            setattr(config, field, values[0])
            changed[field] = values[0]
    return changed, uneven
