"""A search's state while it runs: inputs, signals, every evaluation so far, the budget spent.

:meth:`Search.evaluate` is the one place a candidate is evaluated: read back from the log of an
earlier run of the same search, or built (a deep copy, by the techniques' verbs), scored on the
validation split, measured, and logged before the next one starts.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.batch import batch_len, first_row
from slimkit.errors import ConfigError
from slimkit.metrics.model import count_macs, count_nonzero, count_parameters
from slimkit.prune import save_pruned, save_sparse
from slimkit.quant import save_compressed, save_quantized
from slimkit.search import signals as sig
from slimkit.search.result import OBJECTIVE_FIGURE, Evaluation
from slimkit.search.space import Builder, Candidate, Units
from slimkit.utils.io import save_weights

KILL_AFTER = "SLIMKIT_TEST_SEARCH_KILL_AFTER"
OnCandidate = Callable[[Evaluation, "Search"], None]


def saver_for(candidate: Candidate, kept_float: list[str] = (), model: nn.Module | None = None) -> Callable:
    """How the candidate's model is stored (and its size measured): shared weights entropy-coded,
    packed integer layers, the sparse format (the candidate's sparsity, or a model that came to the
    search mostly zeros), the pruned shapes, or plain weights."""
    lowered = {p for layer, p in candidate.precision if layer not in kept_float}
    if "codebook" in lowered:
        return save_compressed
    if lowered:
        return save_quantized
    if candidate.sparsity or (model is not None and count_nonzero(model) < 0.5 * count_parameters(model)):
        return save_sparse
    return save_pruned if candidate.prune or candidate.blocks else save_weights


class Search:
    """One search's state: the inputs, the signals, every evaluation so far, the budget spent."""

    def __init__(self, model, task, data, config, log, on_candidate=None, note=None):
        self.model, self.task, self.data, self.config, self.log = model, task, data, config, log
        self.on_candidate = on_candidate
        self.note: Callable[[str], None] = note or (lambda _message: None)  # progress of long phases
        self.higher_is_better = task.higher_is_better
        self.evaluations: list[Evaluation] = []
        self.seen: set[str] = set()
        self.spent_s, self.used, self.resumed = 0.0, 0, 0
        self.example = task.example_batch(data.train, config.example_size)
        if config.example_tokens is not None:
            self.example = full_length(self.example, config.example_tokens)
        self.builder = Builder(task, data.train, self._calibration(), config)
        self.units = Units()
        self.layer_names: list[str] = []  # the selected Linear/Conv2d layers (the latency table's rows)
        self.signals: sig.Signals | None = None
        self.floor = math.nan
        self.baseline: Evaluation | None = None
        self.baseline_eval_s = 0.0

    def _calibration(self) -> list:
        out, seen = [], 0
        for batch in self.task.loader(self.data.train, 32):
            out.append(batch)
            seen += batch_len(batch)
            if seen >= self.config.calibration_samples:
                break
        return out

    # -- budget ---------------------------------------------------------------------------------------
    @property
    def recoverable(self) -> bool:
        space = self.config.space
        return bool(space.prune_levels and self.units.groups or space.sparsity_levels or self.units.blocks)

    def reserve(self) -> int:
        """Evaluations kept for recovery training: ``top_k``, at most half the budget."""
        rec, most = self.config.space.recovery, self.config.budget.max_evaluations
        if not (rec.enabled and self.recoverable):
            return 0
        return rec.top_k if most is None else min(rec.top_k, most // 2)

    def exhausted(self, reserve: int | None = None, next_s: float | None = None) -> bool:
        """Whether the next evaluation would overrun the budget, keeping ``reserve`` evaluations
        (default: :meth:`reserve`) and, with a budget in minutes, ``recovery.time_share`` of the
        time for recovery. ``next_s``: what the next evaluation is expected to take (default: the
        mean so far)."""
        budget = self.config.budget
        keep = self.reserve() if reserve is None else reserve
        if budget.max_evaluations is not None and self.used >= max(budget.max_evaluations - keep, 0):
            return True
        if budget.minutes is None:
            return False
        share = (1 - self.config.space.recovery.time_share) if keep else 1.0
        limit = budget.minutes * 60 * share
        per = self.spent_s / max(self.used, 1) if next_s is None else next_s
        return self.spent_s + per > limit

    def seconds_left(self) -> float | None:
        budget, per = self.config.budget, self.spent_s / max(self.used, 1)
        left = [budget.minutes * 60 - self.spent_s] if budget.minutes is not None else []
        left += [per * (budget.max_evaluations - self.used)] if budget.max_evaluations is not None else []
        return max(min(left), 0.0) if left else None

    def shortfall(self, e: Evaluation) -> float:
        gap = self.floor - e.metric if self.higher_is_better else e.metric - self.floor
        return max(gap, 0.0)

    def best(self) -> Evaluation | None:
        ok = [e for e in self.evaluations if e.meets_floor and not e.candidate.is_baseline]
        return min(ok, key=lambda e: (e.objective, e.key), default=None)

    # -- evaluating -----------------------------------------------------------------------------------
    def evaluate(self, candidate: Candidate, phase: str) -> Evaluation:
        """The candidate's figures: read back from the log, or built and measured now (and logged)."""
        key = candidate.key()
        logged = self.log.get(key)
        if logged is not None:
            found = Evaluation.from_entry(logged, len(self.evaluations), phase)
            self.resumed += 0 if candidate.is_baseline else 1
        else:
            found = self._measure(candidate, phase)
            self.log.append(found.to_entry())
            _test_kill(self.used + (0 if candidate.is_baseline else 1))
        self.evaluations.append(found)
        self.seen.add(key)
        if not candidate.is_baseline:
            self.used += 1
            self.spent_s += found.seconds
        if self.on_candidate is not None:
            self.on_candidate(found, self)
        return found

    def _measure(self, candidate: Candidate, phase: str) -> Evaluation:
        t0 = time.perf_counter()
        model, notes = self.builder.build(self.model, candidate)
        metrics = self.task.evaluate(model, self.data.val)
        kept = notes.get("kept_float", [])
        figures = self.figures(model, candidate, kept)
        metric = float(metrics[self.task.metric])
        objective = float(figures[OBJECTIVE_FIGURE[self.config.objective]])
        meets = self.floor_met(metric)
        seconds = time.perf_counter() - t0
        return Evaluation(
            len(self.evaluations), candidate, phase, metric, metrics, figures, objective, meets, seconds, kept
        )

    def floor_met(self, metric: float) -> bool:
        return metric >= self.floor - 1e-12 if self.higher_is_better else metric <= self.floor + 1e-12

    def figures(
        self, model: nn.Module, candidate: Candidate, kept: list[str] = (), only: str | None = None
    ) -> dict[str, Any]:
        """Size on disk, predicted latency and MACs (``only``: just that one, for a probe)."""
        out: dict[str, Any] = {}
        if only in (None, "size_bytes"):
            out["size_bytes"] = _size(model, saver_for(candidate, list(kept), model))
        if self.signals is not None and only in (None, "latency_proxy_ms"):
            precision = {k: v for k, v in candidate.precision if k not in kept}
            out["latency_proxy_ms"] = self.signals.predict_ms(model, precision)
        if only in (None, "macs"):
            out["macs"] = self.macs(model)
        return out

    def macs(self, model: nn.Module) -> int | None:
        """MACs of the example batch, counted on its first row times its rows (every op here is
        per sample: the same figure at a fraction of the time); None when the counter cannot see
        the model's ops."""
        try:
            return count_macs(model, first_row(self.example)) * batch_len(self.example)
        except Exception:
            return None


def full_length(example: Any, tokens: int) -> dict[str, torch.Tensor]:
    """A text batch whose every sequence has ``tokens`` real tokens: each row's own tokens (its
    padding left out) repeated, every position attended, as full-length text would be."""
    ids = example.get("input_ids") if isinstance(example, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError(
            "example_tokens", "applies to text batches (input_ids); this model's inputs are not"
        )
    mask = example.get("attention_mask", torch.ones_like(ids)).bool()
    rows = []
    for row, keep in zip(ids, mask):
        real = row[keep] if bool(keep.any()) else row
        rows.append(real.repeat(-(-tokens // len(real)))[:tokens])
    dtype = example["attention_mask"].dtype if "attention_mask" in example else ids.dtype
    out = {"input_ids": torch.stack(rows), "attention_mask": torch.ones(len(rows), tokens, dtype=dtype)}
    if "token_type_ids" in example:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


def _test_kill(evaluated: int) -> None:
    """Test hook: ``SLIMKIT_TEST_SEARCH_KILL_AFTER=K`` kills the process (SIGKILL, no cleanup at all)
    once K candidates are evaluated and logged, as ``kill -9`` would."""
    wanted = os.environ.get(KILL_AFTER, "")
    if wanted.isdigit() and evaluated >= int(wanted):
        os.kill(os.getpid(), signal.SIGKILL)


def _size(model: nn.Module, saver: Callable) -> int:
    with tempfile.TemporaryDirectory(prefix="slimkit-search-") as folder:
        return int(saver(model, Path(folder) / "model.safetensors"))
