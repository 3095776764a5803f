"""Calibration across processes: under torchrun every rank ends with the statistics of all ranks' data.

``torchrun --nproc_per_node=N`` starts N copies of a script; each calibrates on
its own share of the batches, and before any layer is built every collector's
``all_reduce_(env)`` merges the ranks' statistics, so all ranks build the same
layers from the statistics one process would have gathered on all the batches:

- GPTQ's Hessian (:class:`~slimkit.calibration.collectors.HessianAccumulator`): ``2 X^T X``
  and the row count summed;
- SmoothQuant's :class:`~slimkit.quant.collectors.ChannelAbsMax`: the maximum;
- AWQ's :class:`~slimkit.quant.collectors.ActivationSample`: ``|x|`` sums and
  counts summed, the row samples gathered in global batch order under the same
  row budget;
- activation observers: ``minmax`` (the extremes) and ``percentile`` (the mean
  of the per-batch percentiles). ``moving_average`` and ``mse`` are refused, as
  is ``mixed`` (its sensitivity analysis runs on the batches themselves), with
  a :class:`~slimkit.errors.ConfigError` before any calibration pass.

A single process (no process group, or a world of one) does nothing extra. A
collector of a plugin method takes part by defining ``all_reduce_(env)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from slimkit.calibration.collectors import Collectors
from slimkit.errors import ConfigError, DataError
from slimkit.quant.method import method_for
from slimkit.quant.observers import Observer
from slimkit.quant.plan import Plan, get_module, layer_method
from slimkit.train.distributed import DistEnv, current, gather_objects


def calibration_env() -> DistEnv | None:
    """This process's place among the calibrating processes (joining torchrun's group), None if alone."""
    return current()


def planned_collectors(model: nn.Module, plan: Plan) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(layer, fresh collectors)`` for each planned layer, one at a time (none are kept)."""
    for name, cfg in plan.layers.items():
        method = layer_method(cfg)
        if method is not None:
            yield name, method.collectors(cfg, get_module(model, name))


def check_mergeable(
    config: Any,
    collectors: Collectors | Iterable[tuple[str, dict[str, Any]]],
    env: DistEnv | None,
    batches: int | None = None,
) -> None:
    """Refuse, before any calibration pass, a calibration whose statistics cannot be merged across ranks.

    ``batches``: this rank's number of calibration batches; every rank must have one (all
    ranks raise together, rather than the others waiting for a rank that stopped).
    """
    if env is None:
        return
    where = f"under torchrun ({env.world_size} processes)"
    if batches is not None:
        empty = [r for r, n in enumerate(gather_objects(batches, env)) if n == 0]
        if empty:
            raise DataError(
                f"calibration {where}: process {empty[0]} got no batches; each needs at least one"
            )
    if method_for(config).keeps_batches:
        raise ConfigError(
            "method",
            f"{config.method} cannot be calibrated across processes {where}: it analyses the calibration "
            "batches themselves, which stay in each process; run it in one process",
        )
    for layer, found in collectors.items() if isinstance(collectors, dict) else collectors:
        for collector in found.values():
            inner = getattr(collector, "observer", collector)
            if isinstance(inner, Observer) and inner.cross_process:
                raise ConfigError(
                    "activation_observer",
                    f"{inner.kind} cannot be calibrated across processes {where} ({inner.cross_process}; "
                    f"layer {layer}): use minmax or percentile, or run it in one process",
                )
            if not callable(getattr(collector, "all_reduce_", None)):
                raise ConfigError(
                    "method",
                    f"{config.method} cannot be calibrated across processes {where}: its collector "
                    f"{type(collector).__name__} (layer {layer}) has no all_reduce_; run it in one process",
                )
