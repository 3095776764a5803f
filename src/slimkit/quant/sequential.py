"""Block-by-block calibration: bounded memory for models made of a stack of repeated blocks (LLMs).

All-at-once calibration (``prepare_`` -> ``calibrate`` -> ``convert_``) runs the
whole model on every batch with a collector on every layer, so every layer's
statistics (a GPTQ Hessian is ``in x in``) are alive at once. Here, as in the
GPTQ reference code:

1. the calibration batches run through the model only up to the first block
   (the longest ``nn.ModuleList`` of one block type, found by type, never by
   attribute path); its inputs (positional and keyword: attention masks,
   rotary embeddings) are kept, the rest of the model never runs;
2. for each block: its planned layers' collectors are fed from the kept
   inputs, the layers are built (quantized) in the block, and the block's
   outputs, computed by the quantized block, become the next block's inputs.
   Only one block's inputs and one block's statistics are held at a time.
   With ``true_sequential`` the block's layers are taken in stages of layers
   that read the same tensor (attention q/k/v, then the output projection,
   then the MLP's gate/up, then down), each stage calibrated on what the
   already-quantized stages produce;
3. planned layers outside the blocks that need calibration (an ``lm_head``)
   get one pass through the now-quantized model, which stops as soon as the
   last of them has seen its input (so a causal LM's logits, batch x tokens x
   vocabulary, are never made); embeddings and uncalibrated layers outside the
   blocks are built last.

For a model with one block and no true-sequential stages, the result is the
same as all-at-once calibration. Any error restores the layers already
replaced, so the model is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from slimkit.batch import Forward, default_forward, describe_batch
from slimkit.errors import DataError
from slimkit.models.blocks import find_layer_list
from slimkit.quant.builders import build_layer, require_fed
from slimkit.quant.method import method_for
from slimkit.quant.plan import Plan, build_plan, get_module, layer_method, set_module
from slimkit.quant.summary import QuantSummary

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(prefix, blocks)``: the model's stack of repeated blocks, or None if it has none."""
    try:
        prefix, blocks = find_layer_list(model)
    except Exception:
        return None
    return (prefix, blocks) if len(blocks) > 0 else None


def _block_name(prefix: str, i: int) -> str:
    return f"{prefix}.{i}" if prefix else str(i)


def _needs_collectors(model: nn.Module, plan: Plan) -> dict[str, Any]:
    out = {}
    for name, cfg in plan.layers.items():
        method = layer_method(cfg)
        if method is not None and method.collectors(cfg, get_module(model, name)):
            out[name] = cfg
    return out


def _fresh_collectors(model: nn.Module, name: str, cfg: Any) -> dict[str, Any]:
    return layer_method(cfg).collectors(cfg, get_module(model, name))


def _feed(collectors: dict[str, Any], stop: bool = False):
    def hook(module: nn.Module, args: tuple) -> None:
        for collector in collectors.values():
            collector.update(args[0])
        if stop:
            raise _Stop

    return hook


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list, forward: Forward
) -> list[tuple[tuple, dict]]:
    """Each batch's inputs to ``block`` (the model stops there); cache arguments are dropped."""
    inputs: list[tuple[tuple, dict]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        inputs.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                forward(model, batch)
            except _Stop:
                pass
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise DataError(
                    f"calibration batch {i} ({describe_batch(batch)}) does not fit the model: {err}"
                ) from err
            if len(inputs) != i + 1:
                raise DataError(f"calibration batch {i} never reached the model's first block")
    finally:
        handle.remove()
    return inputs


def _stages(
    model: nn.Module, block: nn.Module, names: list[str], sample: tuple[tuple, dict]
) -> list[list[str]]:
    """``names`` grouped in call order into stages of layers that read the very same tensor."""
    calls: list[tuple[str, int]] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if all(n != name for n, _ in calls):
                calls.append((name, id(args[0])))

        return hook

    handles = [get_module(model, n).register_forward_pre_hook(record(n)) for n in names]
    try:
        block(*sample[0], **sample[1])
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, input_id in calls:
        if stages and input_id == last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = input_id
    unseen = [n for n in names if all(n != c for c, _ in calls)]
    return stages + ([unseen] if unseen else [])


def quantize_by_block_(
    model: nn.Module,
    config: Any,
    calibration_data: Iterable[Any],
    forward: Forward | None = None,
    max_batches: int | None = None,
    true_sequential: bool = False,
) -> QuantSummary:
    """Quantize ``model`` in place, calibrating one block at a time (see the module's docstring)."""
    found = block_list(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no block list for block-by-block calibration")
    prefix, blocks = found
    forward = forward or default_forward
    plan = build_plan(model, config)
    batches = list(islice(calibration_data, max_batches) if max_batches is not None else calibration_data)
    if not batches:
        raise DataError("calibration: no batches were given")
    calibrated = _needs_collectors(model, plan)
    in_block: list[list[str]] = []
    for i in range(len(blocks)):
        head = _block_name(prefix, i) + "."
        in_block.append([n for n in plan.layers if n.startswith(head)])
    inside = {n for names in in_block for n in names}
    replaced: dict[str, nn.Module] = {}
    new: dict[str, nn.Module] = {}

    def put(name: str, module: nn.Module) -> None:
        replaced.setdefault(name, get_module(model, name))
        set_module(model, name, module)
        new[name] = module

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = _capture_block_inputs(model, blocks[0], batches, forward)
            for i, block in enumerate(blocks):
                names = in_block[i]
                todo = [n for n in names if n in calibrated]
                stages = _stages(model, block, todo, inputs[0]) if true_sequential and todo else [todo]
                for stage in (s for s in stages if s):
                    _calibrate_stage(model, (i, block), stage, plan, inputs, put, stop=true_sequential)
                for name in names:
                    if name not in calibrated:
                        put(name, build_layer(get_module(model, name), plan.layers[name], {}))
                if i + 1 < len(blocks):
                    inputs = [
                        _with_hidden(a, k, _first(_run_block((i, block), j, a, k)))
                        for j, (a, k) in enumerate(inputs)
                    ]
            del inputs
            outside = [n for n in plan.layers if n not in inside]
            _calibrate_outside(model, [n for n in outside if n in calibrated], plan, batches, forward, put)
            for name in outside:
                if name not in calibrated:
                    put(name, build_layer(get_module(model, name), plan.layers[name], {}))
    except BaseException:
        for name, module in replaced.items():
            set_module(model, name, module)
        raise
    finally:
        model.train(was_training)
    return QuantSummary(
        config.method,
        quantized={n: m.extra_repr() for n, m in new.items()},
        skipped=dict(plan.skipped),
        folded={},
        analysis=plan.analysis,
    )


def _run_block(block: tuple[int, nn.Module], j: int, args: tuple, kwargs: dict) -> Any:
    try:
        return block[1](*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"calibration batch {j} does not fit the model's block {block[0]}: {err}") from err


def _calibrate_stage(model, block, stage, plan, inputs, put, stop: bool) -> None:
    collectors = {n: _fresh_collectors(model, n, plan.layers[n]) for n in stage}
    # A stage in call order: its last layer ends the block's pass, nothing after it is needed yet.
    handles = [
        get_module(model, n).register_forward_pre_hook(
            _feed(collectors[n], stop=stop and j == len(stage) - 1)
        )
        for j, n in enumerate(stage)
    ]
    try:
        for j, (args, kwargs) in enumerate(inputs):
            with contextlib.suppress(_Stop):
                _run_block(block, j, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    require_fed({n: collectors[n] for n in stage})
    for name in stage:
        put(name, build_layer(get_module(model, name), plan.layers[name], collectors[name]))


def _calibrate_outside(model, names, plan, batches, forward, put) -> None:
    if not names:
        return
    collectors = {n: _fresh_collectors(model, n, plan.layers[n]) for n in names}
    fed: set[str] = set()

    def feed(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            for collector in collectors[name].values():
                collector.update(args[0])
            fed.add(name)
            if len(fed) == len(
                names
            ):  # all fed: stop before the layer runs (an lm_head's logits are never made)
                raise _Stop

        return hook

    handles = [get_module(model, n).register_forward_pre_hook(feed(n)) for n in names]
    try:
        for batch in batches:
            fed.clear()
            with contextlib.suppress(_Stop):
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    require_fed({n: collectors[n] for n in names})
    for name in names:
        put(name, build_layer(get_module(model, name), plan.layers[name], collectors[name]))


def uses_block_calibration(config: Any, model: nn.Module) -> bool:
    """Whether ``quantize_`` calibrates ``model`` block by block for ``config`` (the method decides)."""
    return bool(method_for(config).calibrates_by_block(config, model))
