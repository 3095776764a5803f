"""Depth pruning: drop whole decoder blocks, ranked by angular influence or by perplexity.

The blocks are the model's longest ``nn.ModuleList`` of one block type
(:func:`slimkit.models.blocks.find_layer_list`), never an attribute path. Each block gets one score on
calibration batches, the lowest go, and the model keeps working as an ordinary model: the list
shrinks, every ``layer_idx`` (the KV cache's slot of an attention) is renumbered, and the config's
``num_hidden_layers`` (and its per-layer lists such as ``layer_types``) follow, so the result saves
as a Hugging Face folder with fewer layers.

- ``angular``: ShortGPT's block influence (Men et al., 2024), ``1 - cos(h_in, h_out)`` per token,
  averaged over the calibration tokens (padding excluded);
- ``perplexity``: the mean calibration loss with the block skipped (its output replaced by its
  input) minus the loss of the whole model, one block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.batch import default_forward
from slimkit.errors import ConfigError
from slimkit.models.blocks import find_layer_list
from slimkit.models.causal_lm import is_causal_lm
from slimkit.prune.config import DepthConfig
from slimkit.prune.hf_config import text_config
from slimkit.prune.importance import run_calibration
from slimkit.prune.methods import no_extra_arguments, register_method
from slimkit.prune.summary import PruneSummary, count_parameters


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def angular_scores(model, blocks: nn.ModuleList, batches: list, forward: Callable) -> torch.Tensor:
    """Per block: mean over the calibration tokens of 1 - cos(block input, block output)."""
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def on_batch(batch):
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        state["mask"] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def hook_for(i):
        def hook(_module, args, kwargs, output):
            h_in, h_out = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            distance = 1 - F.cosine_similarity(h_in, h_out, dim=-1)  # (batch, tokens)
            mask = state["mask"]
            if mask is not None and mask.shape == distance.shape:
                distance = distance[mask]
            sums[i] += distance.sum().double()
            counts[i] += distance.numel()

        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run_calibration(model, batches, forward, len(batches), on_batch=on_batch)
    finally:
        for h in handles:
            h.remove()
    return (sums / counts.clamp_min(1)).float()


def _skip(_module, args, kwargs, output):
    """A forward hook that makes its block the identity (its input goes on, in the output's form)."""
    h_in = _hidden_in(args, kwargs)
    return (h_in, *output[1:]) if isinstance(output, tuple) else h_in


def _lm_loss(model: nn.Module, batch: Any, forward: Callable) -> torch.Tensor:
    """Next-token loss of a text batch (``labels``, else ``input_ids``) when no loss_fn is given."""
    from slimkit.metrics.lm import logits_of, next_token_loss  # metrics imports more than pruning needs

    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ConfigError("importance", "perplexity needs text batches with input_ids (or a loss_fn)")
    return next_token_loss(logits_of(forward(model, batch)), batch.get("labels", batch["input_ids"]))


def perplexity_scores(
    model, blocks: nn.ModuleList, batches: list, forward: Callable, loss_fn: Callable | None
) -> torch.Tensor:
    """Per block: mean calibration loss with the block skipped, minus the whole model's loss."""
    from slimkit.metrics.modes import eval_mode

    loss = loss_fn or (lambda m, b: _lm_loss(m, b, forward))

    def mean_loss() -> float:
        return sum(float(loss(model, b)) for b in batches) / len(batches)

    with eval_mode(model), torch.no_grad():
        base = mean_loss()
        scores = []
        for block in blocks:
            handle = block.register_forward_hook(_skip, with_kwargs=True)
            try:
                scores.append(mean_loss() - base)
            finally:
                handle.remove()
    return torch.tensor(scores)


#: Attribute of a shrunk block list: the indices its blocks had in the model as built (for save_pruned).
KEPT_ATTR = "slimkit_kept_blocks"


def kept_blocks(model: nn.Module) -> tuple[str, list[int]] | None:
    """``(block list name, original indices of the blocks left)`` after depth pruning, else None."""
    for name, module in model.named_modules():
        kept = getattr(module, KEPT_ATTR, None)
        if isinstance(module, nn.ModuleList) and isinstance(kept, list):
            return name, kept
    return None


def drop_blocks_(model: nn.Module, list_name: str, keep: list[int]) -> None:
    """Keep only the blocks ``keep`` (in order); renumber ``layer_idx``, shrink the config."""
    blocks = model.get_submodule(list_name)
    before = len(blocks)
    parent, _, attr = list_name.rpartition(".")
    shrunk = nn.ModuleList(blocks[i] for i in keep)
    origin = getattr(blocks, KEPT_ATTR, list(range(before)))
    setattr(shrunk, KEPT_ATTR, [origin[i] for i in keep])
    setattr(model.get_submodule(parent) if parent else model, attr, shrunk)
    for new, i in enumerate(keep):
        for module in blocks[i].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new  # the KV cache indexes its layers by this
    config = text_config(model)
    if config is not None and getattr(config, "num_hidden_layers", None) == before:
        config.num_hidden_layers = len(keep)
        for name, value in list(vars(config).items()):
            # per-layer lists (Qwen2's layer_types, sliding-window patterns) lose the same entries
            if isinstance(value, (list, tuple)) and len(value) == before and not name.startswith("_"):
                setattr(config, name, type(value)(value[i] for i in keep))


def _batches(calibration: Iterable | None, example: Any, limit: int) -> list:
    batches = list(calibration)[:limit] if calibration is not None else []
    if not batches and example is not None:
        batches = [example]
    if not batches:
        raise ConfigError("calibration", "depth pruning ranks the blocks on calibration batches: give some")
    return batches


def _scores(model, blocks, config, calibration, example_inputs, forward, loss_fn) -> torch.Tensor:
    """One importance per block (lowest goes first)."""
    if config.importance == "perplexity" and loss_fn is None and not is_causal_lm(model):
        raise ConfigError(
            "importance", f"perplexity needs a causal LM or a loss_fn; {type(model).__name__} is not"
        )
    batches = _batches(calibration, example_inputs, config.calibration_batches)
    forward = forward or default_forward
    if config.importance == "angular":
        return angular_scores(model, blocks, batches, forward)
    return perplexity_scores(model, blocks, batches, forward, loss_fn)


@register_method(DepthConfig)
def prune_depth_(
    model: nn.Module,
    config: DepthConfig,
    calibration: Iterable | None = None,
    example_inputs: Any = None,
    forward: Callable | None = None,
    loss_fn: Callable | None = None,
    **kwargs: Any,
) -> PruneSummary:
    """Drop ``config``'s number of blocks in place; everything is checked and scored first."""
    no_extra_arguments("depth", kwargs)
    list_name, blocks = find_layer_list(model)
    n = len(blocks)
    drop = config.dropped(n)
    if drop >= n:
        field = next(f for f in ("blocks", "ratio", "indices") if getattr(config, f) is not None)
        raise ConfigError(
            field, f"would drop {drop} of the {n} blocks of {list_name}: at least one must stay"
        )
    if config.indices is not None:
        if max(config.indices) >= n:
            raise ConfigError("indices", f"{list_name} has blocks 0..{n - 1}, not {max(config.indices)}")
        scores, dropped = torch.zeros(0), sorted(config.indices)
    else:
        scores = _scores(model, blocks, config, calibration, example_inputs, forward, loss_fn)
        dropped = sorted(torch.argsort(scores, stable=True).tolist()[:drop])
    summary = PruneSummary(method="depth", params_before=count_parameters(model))
    drop_blocks_(model, list_name, [i for i in range(n) if i not in dropped])
    summary.params_after = count_parameters(model)
    summary.groups = [{"name": list_name, "kind": "blocks", "before": n, "after": n - drop}]
    summary.config = {"num_hidden_layers": n - drop} if text_config(model) is not None else {}
    summary.details = {
        "importance": config.importance if config.indices is None else "given",
        "scores": [round(float(s), 6) for s in scores],
        "dropped": dropped,
    }
    return summary
