"""Block-by-block quantization: the quant side of :func:`slimkit.calibration.blocks.calibrate_by_block_`.

The driver (core, shared with pruning) holds one block's inputs at a time and
replaces each planned layer by what a callback builds from its collectors;
here the plan says which layers, each layer's method gives its collectors
(``{}``: built without calibration, e.g. RTN or an embedding table) and builds
its quantized replacement, and under ``torchrun`` the statistics are checked
mergeable before any pass (:func:`slimkit.quant.distributed.check_mergeable`).

With the inputs held in float32, calibration memory cannot be below
1 + inputs / model bytes (SmolLM2-135M, 128 x 1024 tokens: 1 + 288 MiB / 513 MiB = 1.56x).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

from torch import nn

from slimkit.batch import Forward
from slimkit.calibration.blocks import block_list, calibrate_by_block_
from slimkit.quant.builders import build_layer
from slimkit.quant.distributed import calibration_env, check_mergeable, planned_collectors
from slimkit.quant.method import method_for
from slimkit.quant.plan import build_plan, layer_method
from slimkit.quant.summary import QuantSummary


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
    """Quantize ``model`` in place, calibrating one block at a time (:mod:`slimkit.calibration.blocks`).

    ``micro_batch``: split each calibration batch into pieces of at most this many samples
    (the same result as giving batches that small); ``hold``: ``memory`` (float, as
    computed), ``bfloat16`` (half the bytes, rounded) or ``disk`` (a temporary folder).
    Not given, they are the config's ``micro_batch`` / ``hold_inputs`` fields where it
    has them (None / ``memory`` otherwise: the batches as given, inputs in float).
    """
    micro_batch = micro_batch if micro_batch is not None else getattr(config, "micro_batch", None)
    hold = hold or getattr(config, "hold_inputs", None) or "memory"
    if block_list(model) is None:
        raise ValueError(f"{type(model).__name__} has no block list for block-by-block calibration")
    plan = build_plan(model, config)
    batches = list(islice(calibration_data, max_batches) if max_batches is not None else calibration_data)
    env = calibration_env()
    check_mergeable(config, planned_collectors(model, plan), env, len(batches))

    def collectors(name: str, module: nn.Module) -> dict[str, Any]:
        method = layer_method(plan.layers[name])
        return method.collectors(plan.layers[name], module) if method is not None else {}

    new = calibrate_by_block_(
        model,
        batches,
        forward,
        layers=list(plan.layers),
        collectors=collectors,
        build=lambda name, module, found: build_layer(module, plan.layers[name], found),
        true_sequential=true_sequential,
        micro_batch=micro_batch,
        hold=hold,
        env=env,
    )
    return QuantSummary(
        config.method,
        quantized={n: m.extra_repr() for n, m in new.items()},
        skipped=dict(plan.skipped),
        folded={},
        analysis=plan.analysis,
    )


def uses_block_calibration(config: Any, model: nn.Module) -> bool:
    """Whether ``quantize_`` calibrates ``model`` block by block for ``config`` (the method decides)."""
    return bool(method_for(config).calibrates_by_block(config, model))
