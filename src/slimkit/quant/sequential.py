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

Under ``torchrun`` each process runs its own share of the batches through the
blocks; each stage's statistics are merged across the processes before its
layers are built (:mod:`slimkit.quant.distributed`), so every process builds
the same layers (GPTQ and AWQ are deterministic given the statistics) and the
processes stay in step, block after block, as one process calibrated on all
the batches would.

Memory (:mod:`slimkit.quant.block_inputs`): the kept inputs are replaced by
each block's outputs in place, keyword tensors equal in every batch (rotary
cos/sin) are kept once, and a model's key/value cache is never passed to the
blocks (it would grow with every pass). ``micro_batch`` runs the blocks on at
most that many samples at a time (exactly as if the batches had been given
that small), bounding the block's activations and each collector update;
``hold`` keeps the inputs in bfloat16 or on disk. Calibration memory is
measured (``slimkit.metrics.PeakRSS``) as the peak RSS during the call minus
the RSS before the model was loaded, over the fp32 model's parameter bytes.
With the inputs held in float32 it cannot be below 1 + inputs / model bytes
(SmolLM2-135M, 128 x 1024 tokens: 1 + 288 MiB / 513 MiB = 1.56x).
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
from slimkit.quant.block_inputs import HeldInputs, split_batch
from slimkit.quant.builders import build_layer, require_fed
from slimkit.quant.distributed import (
    all_reduce_collectors_,
    calibration_env,
    check_mergeable,
    planned_collectors,
)
from slimkit.quant.method import method_for
from slimkit.quant.plan import Plan, build_plan, get_module, layer_method, set_module
from slimkit.quant.summary import QuantSummary
from slimkit.utils.memory import release_free_memory

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


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
    """The planned layers that calibrate (their method gives them collectors)."""
    return {name: plan.layers[name] for name, found in planned_collectors(model, plan) if found}


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


def _is_cache(name: str, value: Any) -> bool:
    # By name or by kind (a transformers Cache, whatever the argument is called in this version).
    return name in _CACHE_KWARGS or callable(getattr(value, "get_seq_length", None))


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list, forward: Forward, inputs: HeldInputs
) -> HeldInputs:
    """Each batch's inputs to ``block`` into ``inputs`` (the model stops there); cache arguments are dropped."""

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: (None if _is_cache(k, v) else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        inputs.append(args, kwargs)
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
    # The tensors themselves, not their id(): a freed tensor's id is reused by the next one made (an
    # attention output and the norm after it), which merged stages at random.
    calls: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if all(n != name for n, _ in calls):
                calls.append((name, args[0]))

        return hook

    handles = [get_module(model, n).register_forward_pre_hook(record(n)) for n in names]
    try:
        block(*sample[0], **sample[1])
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, seen in calls:
        if stages and seen is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = seen
    unseen = [n for n in names if all(n != c for c, _ in calls)]
    return stages + ([unseen] if unseen else [])


def quantize_by_block_(
    model: nn.Module,
    config: Any,
    calibration_data: Iterable[Any],
    forward: Forward | None = None,
    max_batches: int | None = None,
    true_sequential: bool = False,
    micro_batch: int | None = None,
    hold: str | None = None,
) -> QuantSummary:
    """Quantize ``model`` in place, calibrating one block at a time (see the module's docstring).

    ``micro_batch``: split each calibration batch into pieces of at most this many samples
    (the same result as giving batches that small); ``hold``: ``memory`` (float, as
    computed), ``bfloat16`` (half the bytes, rounded) or ``disk`` (a temporary folder).
    Not given, they are the config's ``micro_batch`` / ``hold_inputs`` fields where it
    has them (None / ``memory`` otherwise: the batches as given, inputs in float).
    """
    micro_batch = micro_batch if micro_batch is not None else getattr(config, "micro_batch", None)
    hold = hold or getattr(config, "hold_inputs", None) or "memory"
    found = block_list(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no block list for block-by-block calibration")
    prefix, blocks = found
    forward = forward or default_forward
    plan = build_plan(model, config)
    batches = list(islice(calibration_data, max_batches) if max_batches is not None else calibration_data)
    batches = [piece for batch in batches for piece in split_batch(batch, micro_batch)]
    held = HeldInputs(hold)
    check_mergeable(config, planned_collectors(model, plan), calibration_env(), len(batches))
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
            _capture_block_inputs(model, blocks[0], batches, forward, held)
            _calibrate_blocks(model, blocks, in_block, calibrated, plan, held, put, true_sequential)
            held.close()
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
        held.close()
        model.train(was_training)
    return QuantSummary(
        config.method,
        quantized={n: m.extra_repr() for n, m in new.items()},
        skipped=dict(plan.skipped),
        folded={},
        analysis=plan.analysis,
    )


def _calibrate_blocks(
    model, blocks, in_block, calibrated, plan, inputs: HeldInputs, put, true_sequential
) -> None:
    """Each block in turn: its layers built (calibrated on ``inputs``), then its outputs become ``inputs``."""
    for i, block in enumerate(blocks):
        names = in_block[i]
        todo = [n for n in names if n in calibrated]
        stages = _stages(model, block, todo, inputs.get(0)) if true_sequential and todo else [todo]
        for stage in (s for s in stages if s):
            _calibrate_stage(model, (i, block), stage, plan, inputs, put, stop=true_sequential)
        for name in names:
            if name not in calibrated:
                put(name, build_layer(get_module(model, name), plan.layers[name], {}))
        if i + 1 < len(blocks):
            for j in range(len(inputs)):  # in place: one batch's outputs replace its inputs
                inputs.set_hidden(j, _first(_run_block((i, block), j, *inputs.get(j))))
        release_free_memory()  # the block's temporaries: freed, but glibc would keep them resident


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
        for j in range(len(inputs)):
            with contextlib.suppress(_Stop):
                _run_block(block, j, *inputs.get(j))
    finally:
        for handle in handles:
            handle.remove()
    all_reduce_collectors_(collectors, calibration_env())  # under torchrun: all ranks' statistics
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
    all_reduce_collectors_(collectors, calibration_env())
    require_fed({n: collectors[n] for n in names})
    for name in names:
        put(name, build_layer(get_module(model, name), plan.layers[name], collectors[name]))


def by_block_when(model: nn.Module, sequential: bool | None) -> bool:
    """A method's ``calibrates_by_block``: a config's ``sequential`` (None: causal LMs), if it has blocks."""
    if sequential is False or block_list(model) is None:
        return False
    if sequential is None:
        from slimkit.models.causal_lm import is_causal_lm

        return is_causal_lm(model)
    return True


def uses_block_calibration(config: Any, model: nn.Module) -> bool:
    """Whether ``quantize_`` calibrates ``model`` block by block for ``config`` (the method decides)."""
    return bool(method_for(config).calibrates_by_block(config, model))
