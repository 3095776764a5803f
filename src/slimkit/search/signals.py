"""The cheap signals, measured once before the search: a per-layer latency table and sensitivities.

- **Latency table**: every selected Linear/Conv2d layer is timed alone on the input it receives
  from the example batch, in fp32 and in every precision the space allows (the layer quantized by
  ``quantize_`` inside a one-layer wrapper, calibrated on the layer's own calibration inputs), all
  interleaved in one :func:`compare_latency` round. A model's latency is then predicted as the
  time outside these layers (end-to-end fp32 minus the fp32 layers) plus each layer's time at its
  precision, scaled by the share of its weights that structured pruning kept (the time outside
  shrinks in proportion to the layers' fp32 time kept; a dropped block's layers count 0). The prediction is
  checked once against an end-to-end measurement (``proxy_check``), and the search reports it.
- **Sensitivities**: the relative output error ``||y' - y||^2 / ||y||^2`` on calibration batches
  when one unit alone is changed (one layer lowered, one group pruned, the sparsity level), with
  the objective that change alone reaches; the greedy pass walks them least sensitive first.

Timings are noisy, so they are measured once and kept (``signals.json`` in the search's state
folder): a resumed search reads them back and makes the same choices.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.batch import first_output
from slimkit.errors import ModelError
from slimkit.metrics.modes import eval_mode
from slimkit.metrics.speed import compare_latency
from slimkit.quant.sensitivity import relative_error  # the measure mixed precision ranks layers by
from slimkit.search.space import Candidate, lower_, method_config, renamer
from slimkit.tasks import TaskAdapter

CAPTURE_BATCHES = 4  # calibration batches whose outputs (and layer inputs) the sensitivities use


@dataclass
class Signals:
    int8_method: str
    layer_ms: dict[str, dict[str, float]]  # layer -> precision -> median ms on the example input
    layer_shape: dict[str, list[int]]  # layer -> [inputs, outputs] (features or channels)
    total_ms: float  # the whole fp32 model on the example batch
    single: dict[str, dict[str, float]] = field(default_factory=dict)  # move -> sensitivity, objective
    proxy_check: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def outside_ms(self) -> float:
        """Time outside the tabled layers (activations, pooling, ...); never below zero."""
        return max(self.total_ms - sum(t["fp32"] for t in self.layer_ms.values()), 0.0)

    def allowed(self) -> dict[str, list[str]]:
        return {layer: [p for p in times if p != "fp32"] for layer, times in self.layer_ms.items()}

    def predict_ms(self, model: nn.Module, precision: dict[str, str]) -> float:
        """Predicted latency of ``model`` (a built candidate) whose layers run at ``precision``."""
        modules, rename = dict(model.named_modules()), renamer(model)
        total, kept_fp32, all_fp32 = 0.0, 0.0, 0.0
        for layer, times in self.layer_ms.items():
            all_fp32 += times["fp32"]
            module = modules.get(rename(layer))
            if module is None:
                continue  # its block was dropped
            share = _kept_share(module, self.layer_shape[layer])
            total += times[precision.get(layer, "fp32")] * share
            kept_fp32 += times["fp32"] * share
        # The ops between the layers (activations, attention scores, norms, pooling) work on the
        # layers' outputs: they shrink with them, as a pruned or dropped block's do.
        return total + self.outside_ms * (kept_fp32 / all_fp32 if all_fp32 > 0 else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signals:
        return cls(**data)


def move_key(kind: str, unit: str | None, level: Any) -> str:
    return f"{kind}|{unit or ''}|{level}"


def layer_shape(module: nn.Module) -> list[int] | None:
    for names in (("in_features", "out_features"), ("in_channels", "out_channels")):
        values = [getattr(module, n, None) for n in names]
        if all(isinstance(v, int) for v in values):
            return values
    return None


def _kept_share(module: nn.Module, base: list[int]) -> float:
    now = layer_shape(module) or base
    return (now[0] * now[1]) / max(base[0] * base[1], 1)


class _Solo(nn.Module):
    """One layer as a model, so that ``quantize_`` builds exactly the layer the search would."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def capture_inputs(
    model: nn.Module, layers: list[str], example: Any, batches: list, task: TaskAdapter
) -> dict[str, list]:
    """Each layer's first input tensor on the example (model inputs, first) and on every batch."""
    modules = dict(model.named_modules())
    seen: dict[str, list] = {name: [] for name in layers}
    count = [0]

    def hook(name: str):
        def record(_module, args):
            if len(seen[name]) <= count[0] and isinstance(args[0], torch.Tensor):
                seen[name].append(args[0].detach().clone())

        return record

    runs = [lambda: task.call(model, example)] + [lambda b=b: task.forward(model, b) for b in batches]
    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    try:
        with eval_mode(model), torch.no_grad():
            for run in runs:
                run()
                count[0] += 1
    finally:
        for handle in handles:
            handle.remove()
    return seen


def lowered_layer(
    layer: nn.Module, precision: str, method: str, config: Any, inputs: list
) -> nn.Module | None:
    """``layer`` (a copy) at ``precision``, or None when the quantization method keeps it float."""
    solo = _Solo(copy.deepcopy(layer))
    cfg = method_config(precision, config, method, include=["layer"])
    try:
        summary = lower_(solo, cfg, inputs, lambda m, x: m(x))
    except ModelError:  # no layer the method can take (a Conv2d for bf16/int4, odd shapes)
        return None
    return None if "layer" in summary.skipped or "layer" not in summary.quantized else solo.layer.eval()


def layer_variants(model, layers, inputs, config) -> dict[str, dict[str, nn.Module]]:
    """``{layer: {precision: module}}``; int8 in both methods when ``int8_method`` is ``auto``."""
    space = config.space
    int8 = ["int8_static", "int8_dynamic"] if space.int8_method == "auto" else [space.int8_method]
    modules, out = dict(model.named_modules()), {}
    for name in layers:
        out[name] = {"fp32": modules[name]}
        for precision in space.levels_precision:
            for method in int8 if precision == "int8" else [precision]:
                made = lowered_layer(modules[name], precision, method, config, inputs[name][1:])
                if made is not None:
                    out[name][method if precision == "int8" else precision] = made
    return out


def time_layers(model, variants, example_inputs, example, task, threads) -> tuple[dict, float]:
    """Median ms of every variant on its layer's example input, and of the whole fp32 model."""
    fns: dict[str, Callable] = {"model": lambda: task.call(model, example)}
    for layer, made in variants.items():
        x = example_inputs[layer][0]
        for precision, module in made.items():
            fns[f"{layer}|{precision}"] = lambda m=module, x=x: m(x)
    with eval_mode(model):
        timed = compare_latency(fns, warmup=3, repeats=15, threads=threads)
    table: dict[str, dict[str, float]] = {}
    for name, stats in timed.stats.items():
        if name != "model":
            layer, _, precision = name.rpartition("|")
            table.setdefault(layer, {})[precision] = stats.median_ms
    return table, timed["model"].median_ms


def pick_int8(table: dict[str, dict[str, float]], method: str) -> tuple[str, dict[str, dict[str, float]]]:
    """The int8 method (``auto``: the one faster summed over the layers both take), and the table
    with its times under ``int8``."""
    if method == "auto":
        both = [t for t in table.values() if "int8_static" in t and "int8_dynamic" in t]
        static = sum(t["int8_static"] for t in both)
        dynamic = sum(t["int8_dynamic"] for t in both)
        method = "int8_dynamic" if both and dynamic < static else "int8_static"
    out = {}
    for layer, times in table.items():
        row = {p: v for p, v in times.items() if not p.startswith("int8_")}
        if method in times:
            row["int8"] = times[method]
        out[layer] = row
    return method, out


def outputs(model: nn.Module, batches: list, task: TaskAdapter) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        return [first_output(task.forward(model, b)).detach().float().clone() for b in batches]


def swapped(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` sharing every layer but ``name``, which is ``module``: the
    model given keeps its own layer (a sensitivity probe never changes it)."""
    parent_name, _, child = name.rpartition(".")
    top = copy.copy(model)
    top._modules = dict(model._modules)
    node = top
    for part in parent_name.split(".") if parent_name else []:
        inner = copy.copy(node._modules[part])
        inner._modules = dict(inner._modules)
        node._modules[part] = inner
        node = inner
    node._modules[child] = module
    return top


def single_moves(
    model, candidates, build, objective, batches, task, progress=None
) -> dict[str, dict[str, float]]:
    """Each one-unit candidate's sensitivity and objective; ``candidates``: ``{move key: (candidate,
    model or None)}`` where a ready model (a swapped-in layer) saves building it. ``progress(done,
    total)`` about every tenth of them."""
    reference = outputs(model, batches, task)
    out, step = {}, max(len(candidates) // 10, 1)
    for i, (key, (candidate, ready)) in enumerate(candidates.items(), 1):
        made = ready if ready is not None else build(candidate)
        out[key] = {
            "sensitivity": relative_error(reference, outputs(made, batches, task)),
            "objective": objective(made, candidate),
        }
        if progress is not None and (i % step == 0 or i == len(candidates)):
            progress(i, len(candidates))
    return out


def time_models(models: dict[str, nn.Module], task: TaskAdapter, example: Any, repeats: int, threads: int):
    """``compare_latency`` of whole models on the example, interleaved, each in eval mode under
    no_grad (timing a model given in train mode must not move its BatchNorm statistics)."""
    with contextlib.ExitStack() as stack, torch.no_grad():
        for model in models.values():
            stack.enter_context(eval_mode(model))
        fns = {name: (lambda m=model: task.call(m, example)) for name, model in models.items()}
        return compare_latency(fns, warmup=3, repeats=repeats, threads=threads)


def check_proxy(signals: Signals, model: nn.Module, build, example, task, threads) -> dict[str, Any]:
    """The latency proxy against one end-to-end measurement of a model it did not time whole: every
    layer at its fastest precision below fp32."""
    lowered = {
        layer: {p: t for p, t in times.items() if p != "fp32"} for layer, times in signals.layer_ms.items()
    }
    fastest = {layer: min(times, key=times.get) for layer, times in lowered.items() if times}
    candidate = Candidate.make(precision=fastest)
    made = build(candidate)
    predicted = signals.predict_ms(made, dict(candidate.precision))
    timed = time_models({"fp32": model, "candidate": made}, task, example, 20, threads)
    measured = timed["candidate"].median_ms
    return {
        "candidate": candidate.label(),
        "predicted_ms": predicted,
        "measured_ms": measured,
        "relative_error": (predicted - measured) / measured if measured > 0 else None,
        "fp32_ms": timed["fp32"].median_ms,
    }
