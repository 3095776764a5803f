"""Run a validated recipe: load, run each step, measure each step, write one run folder.

The run folder is built under a temporary name and renamed into place only
when everything succeeded, so a crashed or interrupted run never leaves a
folder that looks complete; what an interrupted run had done is kept beside
the output (:mod:`slimkit.recipes.resume`), so that ``--resume`` goes on from
there with the same result. Latency is measured at the end for all steps
together, interleaved, so the speedups in the report are fair ratios on a
noisy machine.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from slimkit.data.lm import prepare_for_model
from slimkit.data.registry import load_data
from slimkit.errors import ConfigError, NonFiniteError
from slimkit.export.onnx import OrtModule
from slimkit.metrics.model import count_macs, count_nonzero, count_parameters, peak_memory
from slimkit.metrics.speed import compare_latency
from slimkit.models.loading import load_model
from slimkit.recipes.lm_measure import check_generation, measure_generation
from slimkit.recipes.output import run_folder
from slimkit.recipes.reproduce import write_reproduction
from slimkit.recipes.resume import PartialRun
from slimkit.recipes.schema import Recipe, Step
from slimkit.recipes.steps import RunContext, StepResult, step_type
from slimkit.recipes.steps.base import Saver, without
from slimkit.recipes.steps.saving import SavedModel, first_format, format_named, format_of
from slimkit.report import Report
from slimkit.report.sections import NOTES_KEY as SECTIONS_NOTE
from slimkit.report.sections import Section
from slimkit.tasks import TaskAdapter, build_task, check_labels_fit
from slimkit.train import distributed
from slimkit.utils.io import save_weights
from slimkit.utils.quiet import quiet_libraries
from slimkit.utils.sysinfo import machine_line


@dataclass
class _Current:
    """The run's state between steps; only the runner changes it, from each step's :class:`StepResult`."""

    model: torch.nn.Module
    saver: Saver = save_weights
    weights_name: str = "model.safetensors"

    def apply(self, result: StepResult) -> None:
        if not isinstance(result, StepResult):
            raise TypeError(f"a recipe step must return a StepResult, got {type(result).__name__}")
        self.model = result.model
        if result.saver is not None:  # a new saver: its file name, unless the step names one
            fmt = format_of(result.saver)
            self.saver = result.saver
            self.weights_name = fmt.file_name if fmt is not None else "model.safetensors"
        self.weights_name = result.weights_name or self.weights_name


@dataclass
class Snapshot:
    """One measured step: its figures, and a frozen copy of the model for the latency round."""

    step: str
    figures: dict[str, Any]
    model: torch.nn.Module | None


def run_recipe(recipe: Recipe, progress: bool = True, resume: bool = False) -> Path:
    """Run ``recipe`` into its output folder; ``resume`` goes on from an interrupted run of it
    (finished steps reused, the running step from its last checkpoint: see :mod:`slimkit.recipes.resume`)."""
    env = distributed.current()
    if not distributed.is_main_process(env):
        # Under torchrun every rank runs every step (training is data-parallel); only rank 0 keeps a folder.
        with tempfile.TemporaryDirectory(prefix="slimkit-rank-") as scratch, quiet_libraries(True):
            _run_into(recipe, Path(scratch) / "run", progress=False, resume=resume)
        distributed.barrier(env)  # the folder returned exists once rank 0 has moved it into place
        return Path(recipe.output)
    with quiet_libraries(not progress):  # other libraries' bars and log lines (utils.quiet)
        out = _run_into(recipe, Path(recipe.output), progress, resume)
    distributed.barrier(env)
    return out


def _run_into(recipe: Recipe, out: Path, progress: bool, resume: bool = False) -> Path:
    # Locked, marked, built under a temporary name and swapped in only on success (recipes.output).
    with run_folder(out, recipe.overwrite, recipe.name) as tmp:
        log = _logger(tmp / "run.log", progress)
        try:
            _run(recipe, tmp, log, progress, resume)
        finally:
            for handler in list(log.handlers):
                handler.close()
                log.removeHandler(handler)
    return out


def _run(recipe: Recipe, run_dir: Path, log: logging.Logger, progress: bool, resume: bool = False) -> None:
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    # Read (or, starting over, cleared) under the output's lock, which run_folder holds around this.
    partial = PartialRun(recipe, resume, writer=distributed.is_main_process(distributed.current()))
    partial.note(log)
    base = _start(recipe, run_dir, log, progress)
    task, data = base.task, base.data
    fmt = first_format(base.model)  # a causal LM: a Hugging Face folder until a step stores it otherwise
    current = _Current(base.model, fmt.saver, fmt.file_name)
    example = task.example_batch(data.test, recipe.measure.batch_size)
    snapshots = _reuse(partial, recipe, base, current)
    partial.begin()
    for i in range(len(snapshots), len(recipe.steps)):
        snapshots.append(_run_step(i, recipe.steps[i], len(recipe.steps), base, current, example, partial))
    measure_generation(snapshots, base)  # language models' tokens/s, while the snapshots hold their models
    _time_all(snapshots, example, task, recipe, log)
    _report(snapshots, task, recipe).save(run_dir)
    _save_final(current, run_dir, base, Path(recipe.output))
    resolved = dict(recipe.to_dict(), output=str(Path(recipe.output)))
    (run_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    write_reproduction(recipe, run_dir)  # a search step's model, rebuilt by ordinary steps
    log.info("done in %.1f s: %s", time.perf_counter() - started, recipe.output)
    partial.discard()  # still under the output's lock; the folder is complete, only its rename is left


def _run_step(
    i: int, step: Step, total: int, base: RunContext, current: _Current, example: Any, partial: PartialRun
) -> Snapshot:
    """Run step ``i`` on the current model, apply and measure its result, keep it for --resume."""
    base.log.info("step %d/%d: %s (%s)", i + 1, total, step.name, step.type)
    t0 = time.perf_counter()
    before = set(os.listdir(base.run_dir))
    ctx = replace(base, model=current.model, checkpoints=partial.checkpoints(i, step.name))
    try:
        result = step_type(step.type, f"steps[{i}].type").run(ctx, step.config)
    except ConfigError as err:  # a setting that only the data or model could rule out
        raise err.prefixed(f"steps[{i}]") from None
    except NonFiniteError as err:  # NaN/inf in training: name the step it happened in
        raise err.in_step(f"steps[{i}] ({step.name})") from None
    current.apply(result)
    snapshot = _measure(current, base, step.name, example, result.notes)
    snapshot.figures["step_time_s"] = round(time.perf_counter() - t0, 2)
    base.log.info("  %s", {k: v for k, v in snapshot.figures.items() if k != "extra"})
    # Files the step wrote into the run folder (a plot, the .onnx) are kept with it for --resume.
    made = sorted(base.run_dir / n for n in set(os.listdir(base.run_dir)) - before if not n.startswith("."))
    partial.finish(i, step.name, current, snapshot.figures, made)
    if partial.should_stop_after(step.name):
        raise KeyboardInterrupt(f"test hook: stopped after step {step.name}")
    return snapshot


def _reuse(partial: PartialRun, recipe: Recipe, base: RunContext, current: _Current) -> list[Snapshot]:
    """--resume: the finished steps' models rebuilt from their files, with the figures they had."""
    snapshots = []
    for done in partial.finished:
        step, fmt = recipe.steps[done.index], format_named(done.format)
        partial.files_back(done, base.run_dir)
        saved = SavedModel(partial.folder / done.weights, fmt.loader)
        kind = step_type(step.type, f"steps[{done.index}].type")
        model = kind.rebuild(replace(base, model=current.model), step.config, saved)
        current.apply(StepResult(model, saver=fmt.saver, weights_name=done.weights_name))
        frozen = copy.deepcopy(model).eval() if recipe.measure.latency else None
        snapshots.append(Snapshot(step.name, dict(done.figures), frozen))
        base.log.info(
            "step %d/%d: %s reused (finished before the interruption)",
            done.index + 1,
            len(recipe.steps),
            step.name,
        )
    partial.restore_rng()  # the next step starts from the RNG state it had in the interrupted run
    return snapshots


def _start(recipe: Recipe, run_dir: Path, log: logging.Logger, progress: bool) -> RunContext:
    """Data, model and task: what every step's context holds (the model is replaced step by step)."""
    data = load_data(recipe.data, prefix="data")
    splits = (("train", data.train), ("val", data.val), ("test", data.test))
    log.info("data %s: %s", data.name, {k: len(v) for k, v in splits if v is not None})
    for note in data.info.get("notes", ()):  # e.g. labels 1..5 renumbered to classes 0..4
        log.info("data: %s", note)
    model, tokenizer = load_model(recipe.model, num_classes=data.num_classes, input_shape=data.input_shape)
    # Language models: the text cut into the tokenizer's windows, after checking the model can take them.
    data = prepare_for_model(data, model, tokenizer)
    check_generation(model, data.task, recipe.measure)
    task = build_task(data, tokenizer, max_length=recipe.measure.max_length)
    check_labels_fit(model, data, task)  # a model/data mismatch is named before any step runs
    return RunContext(
        model=model,
        data=data,
        task=task,
        run_dir=run_dir,
        log=log,
        measure=recipe.measure,
        tokenizer=tokenizer,
        seed=recipe.seed,
        progress=progress,
        model_spec=recipe.model,
    )


def _measure(
    current: _Current, ctx: RunContext, step: str, example: Any, notes: Mapping[str, Any]
) -> Snapshot:
    model = current.model
    metrics = ctx.task.evaluate(model, ctx.data.test)
    size = _saved_size(current, ctx.run_dir)
    peak, peak_notes = _peak_inference_memory(model, example, ctx.task)
    figures = {
        "metrics": metrics,
        "size_bytes": size,
        "params": count_parameters(model),
        "nonzero": count_nonzero(model),
        "macs": _macs(model, example, ctx.log),
        "extra": {**notes, "peak_inference_mem_bytes": peak, **peak_notes},
    }
    frozen = copy.deepcopy(model).eval() if ctx.measure.latency else None
    return Snapshot(step, figures, frozen)


def _peak_inference_memory(model: torch.nn.Module, example: Any, task: TaskAdapter) -> tuple[int, dict]:
    """Peak rise of the process's memory (RSS) during one inference call, and a note where it needs one.

    An ONNX Runtime session keeps its memory arena after its first run (the evaluation just
    done), so a call on it grows RSS by a few pages only: the call is measured on a fresh
    session on the same file instead, whose first run allocates what inference needs.
    """
    if isinstance(model, OrtModule):
        fresh = copy.deepcopy(model)  # a new session: the weights load outside the measured call
        with torch.inference_mode():
            peak = peak_memory(lambda: task.call(fresh, example)).peak_bytes
        del fresh
        note = "ONNX Runtime: RSS rise of a fresh session's first call (its arena is kept between calls)"
        return peak, {"peak_inference_mem_note": note}
    with torch.inference_mode():
        return peak_memory(lambda: task.call(model, example)).peak_bytes, {}


def _saved_size(current: _Current, run_dir: Path) -> int:
    path = run_dir / ".size-probe" / current.weights_name
    path.parent.mkdir(exist_ok=True)
    try:
        return current.saver(current.model, path)
    finally:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        path.parent.rmdir()


def _save_final(current: _Current, run_dir: Path, base: RunContext, output: Path) -> None:
    """The run's model; a Hugging Face folder gets the tokenizer too, so that it opens by itself."""
    path = run_dir / current.weights_name
    current.saver(current.model, path)
    if path.is_dir():
        if base.tokenizer is not None:
            base.tokenizer.save_pretrained(str(path))
        base.log.info(
            "model: %s (a Hugging Face folder: AutoModelForCausalLM.from_pretrained opens it)",
            output / current.weights_name,
        )


def _macs(model: torch.nn.Module, example: Any, log: logging.Logger) -> int | None:
    try:
        return count_macs(model, example)
    except Exception as err:  # a model whose ops the counter cannot see still gets a row
        log.warning("MACs not counted: %s", err)
        return None


def _time_all(
    snapshots: list[Snapshot], example: Any, task: TaskAdapter, recipe: Recipe, log: logging.Logger
) -> None:
    timed = {s.step: s for s in snapshots if s.model is not None}
    if not timed:
        return
    m = recipe.measure
    fns = {name: (lambda mod=s.model: task.call(mod, example)) for name, s in timed.items()}
    comparison = compare_latency(
        fns, warmup=m.warmup, repeats=m.repeats, threads=m.threads, batch_size=m.batch_size
    )
    for name, s in timed.items():
        s.figures["latency_ms"] = comparison[name].median_ms
        s.figures["p95_ms"] = comparison[name].p95_ms
        s.model = None
    log.info(
        "latency (median ms, %d threads, batch %d): %s",
        m.threads,
        m.batch_size,
        {n: round(s.figures["latency_ms"], 3) for n, s in timed.items()},
    )


def _report(snapshots: list[Snapshot], task: TaskAdapter, recipe: Recipe) -> Report:
    report = Report(task_metric=task.metric, higher_is_better=task.higher_is_better)
    m = recipe.measure
    report.meta = {
        "recipe": recipe.name,
        "machine": machine_line(),
        "measure": f"latency: median of {m.repeats} runs after {m.warmup} warm-up, batch {m.batch_size}, "
        f"{m.threads} threads, all steps interleaved"
        if m.latency
        else "latency: not measured (measure.latency: false)",
    }
    for s in snapshots:
        f = s.figures
        # Sections a step adds to report.html (a search's Pareto front) leave its notes for the report's.
        for section in f["extra"].get(SECTIONS_NOTE) or []:
            report.add_section(Section.from_json({**section, "step": s.step}))
        report.add_row(
            s.step,
            f["metrics"],
            size_bytes=f["size_bytes"],
            params=f["params"],
            nonzero=f["nonzero"],
            macs=f["macs"],
            latency_ms=f.get("latency_ms"),
            p95_ms=f.get("p95_ms"),
            extra={**without(f["extra"], SECTIONS_NOTE), "step_time_s": f["step_time_s"]},
        )
    return report


def _logger(path: Path, progress: bool) -> logging.Logger:
    log = logging.getLogger(f"slimkit.run.{id(path)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if progress:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    return log
