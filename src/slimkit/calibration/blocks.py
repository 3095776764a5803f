"""Block-by-block calibration: bounded memory for models made of a stack of repeated blocks (LLMs).

All-at-once calibration runs the whole model on every batch with a collector on
every layer, so every layer's statistics (a GPTQ Hessian is ``in x in``) are
alive at once. :func:`calibrate_by_block_` instead, as in the GPTQ reference code:

1. runs the calibration batches through the model only up to the first block
   (the longest ``nn.ModuleList`` of one block type, found by type, never by
   attribute path); its inputs (positional and keyword: attention masks,
   rotary embeddings) are kept, the rest of the model never runs;
2. for each block: its layers' collectors are fed from the kept inputs, each
   layer is replaced by what ``build`` makes of it and its statistics (a
   quantized or pruned layer), and the block's outputs, computed by the
   rebuilt block, become the next block's inputs. Only one block's inputs and
   one block's statistics are held at a time. With ``true_sequential`` the
   block's layers are taken in stages of layers that read the same tensor
   (attention q/k/v, then the output projection, then the MLP's gate/up, then
   down), each stage calibrated on what the already-rebuilt stages produce;
   layers that need no statistics are built when their block is done, before
   its outputs are computed;
3. calibrated layers outside the blocks (an ``lm_head``) get one pass through
   the rebuilt model, which stops as soon as the last of them has seen its
   input (so a causal LM's logits, batch x tokens x vocabulary, are never
   made); the other layers outside the blocks are built last.

For a model with one block and no true-sequential stages, the result is the
same as all-at-once calibration. Any error puts back the layers already
replaced, so the model is left as it was; meanwhile their parameters wait on
disk (:mod:`slimkit.calibration.replaced`), so a replaced layer's float weights
leave memory as soon as its replacement exists.

Under ``torchrun`` each process runs its own share of the batches through the
blocks; each stage's collectors are merged across the processes
(``all_reduce_(env)``) before its layers are built, so every process builds
the same layers (given deterministic builds) and the processes stay in step,
block after block, as one process calibrated on all the batches would.

Memory (:mod:`slimkit.calibration.held`): the kept inputs are replaced by
each block's outputs in place, keyword tensors equal in every batch (rotary
cos/sin) are kept once, and a model's key/value cache is never passed to the
blocks (it would grow with every pass). ``micro_batch`` runs the blocks on at
most that many samples at a time (exactly as if the batches had been given
that small), bounding the block's activations and each collector update;
``hold`` keeps the inputs in bfloat16 or on disk. Calibration memory is
measured (``slimkit.metrics.PeakRSS``) as the peak RSS during the call minus
the RSS before the model was loaded, over the fp32 model's parameter bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.batch import Forward, default_forward, describe_batch
from slimkit.calibration.collectors import all_reduce_collectors_, require_fed
from slimkit.calibration.held import HeldInputs, split_batch
from slimkit.calibration.replaced import Replaced
from slimkit.errors import DataError
from slimkit.models.blocks import find_layer_list
from slimkit.train.distributed import DistEnv
from slimkit.utils.memory import release_free_memory

MakeCollectors = Callable[[str, nn.Module], dict[str, Any]]
Build = Callable[[str, nn.Module, dict[str, Any]], nn.Module]

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


def by_block_when(model: nn.Module, sequential: bool | None) -> bool:
    """Whether to calibrate block by block: a config's ``sequential`` (None: causal LMs), if it has blocks."""
    if sequential is False or block_list(model) is None:
        return False
    if sequential is None:
        from slimkit.models.causal_lm import is_causal_lm

        return is_causal_lm(model)
    return True


class _Run:
    """One call's state: the model, the callbacks, and the layers replaced so far (put back on error)."""

    def __init__(self, model: nn.Module, collectors: MakeCollectors, build: Build, env: DistEnv | None):
        self.model, self.make, self.build, self.env = model, collectors, build, env
        self.replaced = Replaced(model)
        self.new: dict[str, nn.Module] = {}

    def put(self, name: str, collectors: dict[str, Any]) -> None:
        """Replace layer ``name`` by ``build(name, layer, collectors)``."""
        module = self.build(name, self.model.get_submodule(name), collectors)
        self.replaced.replace(name, module)
        self.new[name] = module

    def fresh(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {n: self.make(n, self.model.get_submodule(n)) for n in names}

    def merge_and_build(self, collectors: dict[str, dict[str, Any]]) -> None:
        all_reduce_collectors_(collectors, self.env)  # under torchrun: all ranks' statistics
        require_fed(collectors)
        for name, found in collectors.items():
            self.put(name, found)


def calibrate_by_block_(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    *,
    layers: Sequence[str],
    collectors: MakeCollectors,
    build: Build,
    true_sequential: bool = False,
    micro_batch: int | None = None,
    hold: str = "memory",
    env: DistEnv | None = None,
) -> dict[str, nn.Module]:
    """Replace each of ``layers`` in ``model`` by ``build(name, layer, its collectors)``, block by block.

    ``collectors(name, layer)``: fresh collectors for a layer (``{}``: it needs no
    calibration, and is built when its block is done); ``micro_batch``: split each
    batch into pieces of at most this many samples (the same result as giving
    batches that small); ``hold``: where the block inputs are kept (``memory``,
    ``bfloat16`` or ``disk``, see :class:`HeldInputs`); ``env``: the torchrun group
    whose collectors are merged before each stage is built (None: one process).
    Returns ``{name: new module}`` in the order they were built.
    """
    found = block_list(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no block list for block-by-block calibration")
    prefix, blocks = found
    held = HeldInputs(hold)
    batches = [piece for batch in batches for piece in split_batch(batch, micro_batch)]
    if not batches:
        raise DataError("calibration: no batches were given")
    calibrated = {n for n in layers if collectors(n, model.get_submodule(n))}
    in_block, outside = _by_block(prefix, len(blocks), layers)
    run, forward = _Run(model, collectors, build, env), forward or default_forward
    try:
        with _guarded(run, model):
            _capture_block_inputs(model, blocks[0], batches, forward, held)
            _calibrate_blocks(run, blocks, in_block, calibrated, held, true_sequential)
            held.close()
            _calibrate_outside(run, [n for n in outside if n in calibrated], batches, forward)
            for name in outside:
                if name not in calibrated:
                    run.put(name, {})
    finally:
        held.close()
    return run.new


@contextlib.contextmanager
def _guarded(run: _Run, model: nn.Module):
    """Eval mode and no grad inside; on any error every replaced layer is put back; mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    except BaseException:
        run.replaced.restore()
        raise
    finally:
        run.replaced.close()
        model.train(was_training)


def _by_block(prefix: str, n_blocks: int, layers: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """``layers`` in each block (by name prefix), and those outside every block, in the given order."""
    heads = [(f"{prefix}.{i}." if prefix else f"{i}.") for i in range(n_blocks)]
    in_block = [[n for n in layers if n.startswith(head)] for head in heads]
    inside = {n for names in in_block for n in names}
    return in_block, [n for n in layers if n not in inside]


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

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
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


def _calibrate_blocks(
    run: _Run,
    blocks: nn.ModuleList,
    in_block: list[list[str]],
    calibrated: set,
    inputs: HeldInputs,
    staged: bool,
) -> None:
    """Each block in turn: its layers built (calibrated on ``inputs``), then its outputs become ``inputs``."""
    for i, block in enumerate(blocks):
        names = in_block[i]
        todo = [n for n in names if n in calibrated]
        stages = _stages(run.model, block, todo, inputs.get(0)) if staged and todo else [todo]
        for stage in (s for s in stages if s):
            _calibrate_stage(run, (i, block), stage, inputs, stop=staged)
        for name in names:
            if name not in calibrated:
                run.put(name, {})
        if i + 1 < len(blocks):
            for j in range(len(inputs)):  # in place: one batch's outputs replace its inputs
                inputs.set_hidden(j, _first(_run_block((i, block), j, *inputs.get(j))))
        release_free_memory()  # the block's temporaries: freed, but glibc would keep them resident


def _run_block(block: tuple[int, nn.Module], j: int, args: tuple, kwargs: dict) -> Any:
    try:
        return block[1](*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"calibration batch {j} does not fit the model's block {block[0]}: {err}") from err


def _feed(collectors: dict[str, Any], stop: bool = False):
    def hook(module: nn.Module, args: tuple) -> None:
        for collector in collectors.values():
            collector.update(args[0])
        if stop:
            raise _Stop

    return hook


def _calibrate_stage(
    run: _Run, block: tuple[int, nn.Module], stage: list[str], inputs: HeldInputs, stop: bool
):
    collectors = run.fresh(stage)
    # A stage in call order: its last layer ends the block's pass, nothing after it is needed yet.
    handles = [
        run.model.get_submodule(n).register_forward_pre_hook(
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
    run.merge_and_build(collectors)


def _calibrate_outside(run: _Run, names: list[str], batches: list, forward: Forward) -> None:
    """Layers outside the blocks that calibrate: one pass through the model, stopped once all are fed."""
    if not names:
        return
    collectors = run.fresh(names)
    fed: set[str] = set()

    def feed(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            for collector in collectors[name].values():
                collector.update(args[0])
            fed.add(name)
            if len(fed) == len(names):  # all fed: stop before the layer runs (no logits are made)
                raise _Stop

        return hook

    handles = [run.model.get_submodule(n).register_forward_pre_hook(feed(n)) for n in names]
    try:
        for batch in batches:
            fed.clear()
            with contextlib.suppress(_Stop):
                forward(run.model, batch)
    finally:
        for handle in handles:
            handle.remove()
    run.merge_and_build(collectors)


def calibrate_at_once_(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    *,
    layers: Sequence[str],
    collectors: MakeCollectors,
    build: Build,
    env: DistEnv | None = None,
) -> dict[str, nn.Module]:
    """:func:`calibrate_by_block_` for any model: every layer's statistics from one pass over the model
    as given (stopped once the last is fed), then each layer replaced by ``build``; no block list needed.

    Models without a block list, or a config that turns block-by-block calibration off, use it;
    errors put every replaced layer back, as there.
    """
    batches = list(batches)
    if not batches:
        raise DataError("calibration: no batches were given")
    calibrated = [n for n in layers if collectors(n, model.get_submodule(n))]
    run = _Run(model, collectors, build, env)
    with _guarded(run, model):
        _calibrate_outside(run, calibrated, batches, forward or default_forward)
        for name in layers:
            if name not in calibrated:
                run.put(name, {})
    return run.new
