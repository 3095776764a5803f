"""``search(model, task, data, config)``: the fastest (or smallest) model that keeps the floor.

The model given is never changed: every candidate is built on a deep copy by the techniques'
verbs (``prune_``, ``quantize_``, ``distill_``). Candidates are scored on the validation split;
the test split is read once, for the chosen model (and the baseline beside it), so the figure
reported beside the floor is one the search could not have fitted.

Order of work: the baseline is evaluated and every input is checked (floor, objective, budget,
space: ``ConfigError`` naming the field) before the signals are measured and the first candidate
built. With ``state_dir`` the evaluations are logged there as they finish
(:mod:`slimkit.search.log`) and a later call with the same model, data and config reads them back
instead of evaluating again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.data.base import DataBundle
from slimkit.errors import ConfigError
from slimkit.metrics.modes import eval_mode
from slimkit.metrics.speed import fixed_threads
from slimkit.search import signals as sig
from slimkit.search import strategy
from slimkit.search.config import SearchConfig
from slimkit.search.log import CandidateLog, fingerprint
from slimkit.search.result import OBJECTIVE_FIGURE, Evaluation, SearchResult
from slimkit.search.space import Candidate, block_count, prunable_groups, selected
from slimkit.search.state import OnCandidate, Search
from slimkit.tasks import TaskAdapter


def search(
    model: nn.Module,
    task: TaskAdapter,
    data: DataBundle,
    config: SearchConfig,
    *,
    state_dir: str | Path | None = None,
    threads: int = 2,
    on_candidate: OnCandidate | None = None,
    note: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search ``config.space`` for the candidate with the best objective within the floor.

    ``state_dir``: where the evaluations are logged and read back (a resumed search); ``threads``:
    for every timing and evaluation; ``on_candidate(evaluation, search)`` after each candidate;
    ``note(message)``: progress lines while the signals are measured.
    Raises :class:`ConfigError` (the field named) before any candidate when the floor, objective,
    budget or space cannot work for this model.
    """
    if data.val is None or len(data.val) == 0:
        raise ConfigError("data", "a search needs a validation split (the floor is checked on it)")
    with fixed_threads(threads):
        return _run(model, task, data, config, state_dir, threads, on_candidate, note)


def _run(model, task, data, config, state_dir, threads, on_candidate, note) -> SearchResult:
    started = time.perf_counter()
    parts = {"config": repr(config), "splits": [len(data.train), len(data.val)], "threads": threads}
    log = CandidateLog(Path(state_dir) if state_dir is not None else None, fingerprint(model, parts))
    s = Search(model, task, data, config, log, on_candidate, note)
    _check_inputs(s)
    s.signals = _signals(s, threads)
    s.builder.int8_method = s.signals.int8_method  # also when read back from an earlier run
    s.units.layers = {k: v for k, v in s.signals.allowed().items() if v}
    s.evaluations.clear()
    s.evaluate(Candidate(), "baseline")
    s.baseline = s.evaluations[0]
    strategy.greedy(s)
    strategy.uniform(s)
    strategy.refine(s)
    strategy.recover(s)
    return _result(s, threads, time.perf_counter() - started)


def _check_inputs(s: Search) -> None:
    """Baseline, floor, objective, budget and space, before any candidate is built."""
    t0 = time.perf_counter()
    metrics = s.task.evaluate(s.model, s.data.val)
    eval_s = time.perf_counter() - t0
    cfg, metric = s.config, float(metrics[s.task.metric])
    s.floor = cfg.floor.threshold(metric, s.higher_is_better)
    if not s.floor_met(metric):
        side = "below" if s.higher_is_better else "above"
        raise ConfigError(
            "floor",
            f"the model as it is scores {s.task.metric} {metric:.4f} on the validation split, "
            f"{side} the floor {s.floor:.4f} ({cfg.floor.describe()}): no candidate could be chosen",
        )
    try:
        with eval_mode(s.model), torch.no_grad():
            s.task.call(s.model, s.example)
    except Exception as err:
        field = "example_tokens" if cfg.example_tokens is not None else "objective"
        raise ConfigError(field, f"the model cannot run on its example batch ({err})") from None
    if cfg.objective == "macs" and s.macs(s.model) is None:
        raise ConfigError("objective", "macs cannot be counted on this model (its ops are not visible)")
    if cfg.budget.minutes is not None and cfg.budget.minutes * 60 < eval_s:
        raise ConfigError(
            "budget.minutes",
            f"one evaluation takes at least {eval_s:.1f} s (the validation pass alone): "
            f"{cfg.budget.minutes} minutes allow none",
        )
    modules = dict(s.model.named_modules())
    layers = [
        n for n, m in modules.items() if n and isinstance(m, (nn.Linear, nn.Conv2d)) and selected(n, cfg)
    ]
    s.layer_names = layers  # all timed (pruning shrinks them too); lowered only with a precision
    s.units.layers = {n: [] for n in layers} if cfg.space.levels_precision else {}
    s.units.groups = prunable_groups(s.model, s.example, s.task, cfg)
    s.units.blocks = block_count(s.model) if cfg.space.block_levels else 0
    if cfg.space.block_levels and not s.units.block_levels(cfg):
        raise ConfigError(
            "space.blocks",
            f"{type(s.model).__name__} has {s.units.blocks} blocks to drop from: "
            f"dropping {cfg.space.block_levels} would leave none",
        )
    if not (s.units.layers or s.units.groups or s.units.blocks or cfg.space.sparsity_levels):
        raise ConfigError(
            "space",
            f"nothing in {type(s.model).__name__} can change: no Linear/Conv2d layer matches "
            "space.include for a precision and no channel group can be pruned",
        )
    s.baseline_eval_s = eval_s


def _signals(s: Search, threads: int) -> sig.Signals:
    """The signals from an earlier run of this search, or measured now (and kept)."""
    kept = s.log.signals()
    if kept is not None:
        return sig.Signals.from_dict(kept)
    t0 = time.perf_counter()
    layers = sorted(s.layer_names)
    batches = s.builder.calibration[: sig.CAPTURE_BATCHES]
    inputs = sig.capture_inputs(s.model, layers, s.example, batches, s.task)
    variants = sig.layer_variants(s.model, layers, inputs, s.config)
    table, total = sig.time_layers(s.model, variants, inputs, s.example, s.task, threads)
    method, table = sig.pick_int8(table, s.config.space.int8_method)
    s.note(f"signals: {len(table)} layers timed in {time.perf_counter() - t0:.0f} s; int8 runs {method}")
    shapes = {n: sig.layer_shape(dict(s.model.named_modules())[n]) for n in layers}
    found = sig.Signals(method, table, shapes, total)
    s.signals, s.builder.int8_method = found, method
    s.units.layers = {k: v for k, v in found.allowed().items() if v}
    figure = OBJECTIVE_FIGURE[s.config.objective]
    found.single = sig.single_moves(
        s.model,
        _single_candidates(s, variants),
        lambda c: s.builder.build(s.model, c)[0],
        lambda m, c: s.figures(m, c, only=figure)[figure],
        batches,
        s.task,
        lambda done, total: s.note(f"signals: {done}/{total} single-unit sensitivities measured"),
    )
    if table:
        found.proxy_check = sig.check_proxy(
            found, s.model, lambda c: s.builder.build(s.model, c)[0], s.example, s.task, threads
        )
    found.seconds = time.perf_counter() - t0
    s.log.save_signals(found.to_dict())
    return found


def _single_candidates(s: Search, variants: dict) -> dict[str, tuple[Candidate, nn.Module | None]]:
    out = {}
    for kind, unit, level in s.units.moves(s.config):
        candidate = Candidate().with_setting(kind, unit, level)
        ready = None
        if kind == "precision":
            name = s.signals.int8_method if level == "int8" else level
            ready = sig.swapped(s.model, unit, variants[unit][name])
        out[sig.move_key(kind, unit, level)] = (candidate, ready)
    return out


def _result(s: Search, threads: int, seconds: float) -> SearchResult:
    base = s.baseline
    better = [
        e
        for e in s.evaluations
        if e.meets_floor and not e.candidate.is_baseline and e.objective < base.objective
    ]
    met = bool(better)
    if met:
        sign = -1 if s.higher_is_better else 1
        chosen = min(better, key=lambda e: (e.objective, sign * e.metric, e.key))
    else:
        tried = [e for e in s.evaluations if not e.candidate.is_baseline] or [base]
        chosen = min(tried, key=lambda e: (s.shortfall(e), e.objective, e.key))
    model, notes = s.builder.build(s.model, chosen.candidate)
    result = SearchResult(
        s.task.metric,
        s.higher_is_better,
        s.config.objective,
        s.floor,
        s.config.floor.describe(),
        base,
        list(s.evaluations),
        chosen,
        met,
        model,
        notes["steps"],
        s.signals,
        resumed=s.resumed,
    )
    result.test_metrics = s.task.evaluate(model, s.data.test)
    result.baseline_test_metrics = s.task.evaluate(s.model, s.data.test)
    result.measured = _measured(s, model, chosen, threads)
    result.seconds = seconds
    return result


def _measured(s: Search, model: nn.Module, chosen: Evaluation, threads: int) -> dict[str, Any]:
    """The chosen model's end-to-end latency beside the baseline's (interleaved), and the proxy's error."""
    timed = sig.time_models({"baseline": s.model, "chosen": model}, s.task, s.example, 30, threads)
    base_ms, ms = timed["baseline"].median_ms, timed["chosen"].median_ms
    proxy = chosen.figures.get("latency_proxy_ms")
    return {
        "baseline_ms": base_ms,
        "chosen_ms": ms,
        "speedup": base_ms / ms if ms > 0 else None,
        "proxy_ms": proxy,
        "proxy_error": (proxy - ms) / ms if proxy is not None and ms > 0 else None,
        "threads": threads,
    }
