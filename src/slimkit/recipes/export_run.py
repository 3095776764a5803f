"""``slimkit export RUN_DIR --to onnx|pt2``: a finished run's final model as a file for another runtime.

The model is rebuilt as ``slimkit generate`` rebuilds it (the resolved recipe's ``model:``, filled
from the saved file by the loader its metadata names; a ``distill`` step's built-in student is
built first). The example is the one the ``export`` step traces: ``example_samples`` train samples
of the run's data, text with padding. Layers that have no form in the target are refused, naming
them, before anything is written. The file is written beside its final name and put there only
once its output on the example matches the PyTorch model's within ``tolerance`` (relative L2, as
the step checks it), so a failed export leaves nothing behind.

``onnx`` runs in ONNX Runtime (:mod:`slimkit.export.onnx`: int8 kernels, QDQ, MatMulNBits, fused
attention); ``pt2`` is ``torch.export``'s program (:mod:`slimkit.export.pt2`), run again in PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimkit.config import from_dict
from slimkit.data.registry import DataConfig
from slimkit.errors import BadInputError, ConfigError
from slimkit.models.loading import ModelConfig
from slimkit.recipes.checks import check_consent
from slimkit.recipes.generate import check_step, fill_model, final_model_file, read_resolved
from slimkit.recipes.measure import MeasureConfig
from slimkit.recipes.runner import _start
from slimkit.recipes.schema import Recipe
from slimkit.recipes.steps.base import RunContext, step_type
from slimkit.recipes.steps.export import OnnxRuntimeExport, export_example, runtime_error
from slimkit.utils.io import atomic_path
from slimkit.utils.quiet import quiet_libraries

TARGETS = {"onnx": ".onnx", "pt2": ".pt2"}
FOLDER = "export"  # inside the run folder: the run's own files are never replaced
OPSETS = (17, 20)  # 17 is the export step's; 20 the newest the TorchScript exporter writes


class ExportError(BadInputError):
    """A run that cannot be exported as asked (target, output file, tolerance): the CLI exits 2."""

    kind = "export error"


@dataclass(frozen=True)
class ExportOptions:
    """The command's flags; ``onnxruntime`` holds the export step's own settings (same defaults)."""

    to: str = "onnx"
    out: str | None = None
    step: str | None = None
    opset: int = 17
    onnxruntime: OnnxRuntimeExport = dataclasses.field(default_factory=OnnxRuntimeExport)
    repeats: int = 10  # latency rounds of the exported and the PyTorch model (0: not measured)
    trust_code: bool = False


@dataclass(frozen=True)
class ExportResult:
    path: Path
    to: str
    size_bytes: int
    samples: int
    max_abs_diff: float
    relative_error: float
    tolerance: float
    latency_ms: dict[str, float] | None = None  # median: the exported model's runtime and "pytorch"

    def lines(self) -> list[str]:
        runtime = "ONNX Runtime" if self.to == "onnx" else "torch.export program"
        out = [
            f"exported: {self.path} ({self.size_bytes:,} bytes, {self.to})",
            f"{runtime} vs PyTorch on {self.samples} train samples: max abs difference "
            f"{self.max_abs_diff:.3g}, relative L2 error {self.relative_error:.3g} "
            f"(tolerance {self.tolerance:g}): ok",
        ]
        if self.latency_ms:
            mine, torch_ms = self.latency_ms[self.to], self.latency_ms["pytorch"]
            out.append(
                f"latency (median, batch of {self.samples}): {runtime} {mine:.3f} ms, "
                f"PyTorch {torch_ms:.3f} ms ({torch_ms / mine:.2f}x)"
            )
        return out


def export_options(**flags: Any) -> ExportOptions:
    """Options from the command's flags, each bad one named by its flag (``--tolerance``)."""
    step_fields = {f.name for f in dataclasses.fields(OnnxRuntimeExport)}
    given = {k: v for k, v in flags.items() if k in step_fields and v is not None}
    try:
        settings = OnnxRuntimeExport(**given)
    except ConfigError as err:
        raise ExportError(f"--{err.path.replace('_', '-')}: {err.message}") from None
    options = ExportOptions(
        **{k: v for k, v in flags.items() if k not in step_fields and v is not None}, onnxruntime=settings
    )
    if options.to not in TARGETS:
        raise ExportError(f"--to: unknown target {options.to!r} (choose one of: {', '.join(TARGETS)})")
    if not OPSETS[0] <= options.opset <= OPSETS[1]:
        raise ExportError(f"--opset: must be {OPSETS[0]} to {OPSETS[1]}, got {options.opset}")
    if options.repeats < 0:
        raise ExportError(f"--repeats: must be 0 (no latency) or more, got {options.repeats}")
    return options


def output_path(run_dir: Path, options: ExportOptions) -> Path:
    """``RUN_DIR/export/model.<to>`` (replaced by a new export), or ``--out``, which must not exist."""
    suffix = TARGETS[options.to]
    if options.out is None:
        return run_dir / FOLDER / f"model{suffix}"
    out = Path(options.out).expanduser()
    if out.suffix != suffix:
        raise ExportError(f"--out: {out} must end with {suffix} for --to {options.to}")
    if out.exists() or out.is_symlink():
        raise ExportError(f"--out: {out} exists; slimkit export does not replace it (choose another file)")
    if not out.parent.is_dir():
        raise ExportError(f"--out: folder {out.parent} does not exist")
    return out


def run_context(run_dir: Path, step: str | None = None, trust_code: bool = False) -> RunContext:
    """The run's data, task and final model (filled from its saved file), as its steps saw them."""
    if not run_dir.is_dir():
        why = "is not a folder" if run_dir.exists() else "no such folder"
        raise ExportError(f"{run_dir}: {why} (give a run folder that slimkit run wrote)")
    raw = read_resolved(run_dir)
    check_step(raw, run_dir, step)
    file = final_model_file(run_dir, "is exported already")
    recipe = Recipe(  # weights: the run's saved file replaces them (the original may be gone)
        model=from_dict(ModelConfig, {**raw["model"], "weights": None}, "model"),
        data=from_dict(DataConfig, raw["data"], "data"),
        steps=[],
        output=str(run_dir),
        seed=raw.get("seed", 0),
        measure=from_dict(MeasureConfig, raw.get("measure", {}), "measure"),
    )
    check_consent(recipe, trust_code or raw.get("trust_code") is True)  # before a factory is imported
    ctx = _start(recipe, run_dir, logging.getLogger("slimkit.export"), progress=False)
    model = _student(ctx, raw["steps"]) or ctx.model
    return dataclasses.replace(ctx, model=fill_model(model, file).eval())


def _student(ctx: RunContext, steps: list) -> torch.nn.Module | None:
    """The built-in student of the run's last ``distill`` step: the recipe's ``model:`` is not the
    final model's class then (layer-dropped and pruned students are shrunk by the loaders instead)."""
    from slimkit.recipes.steps.distill import build_student

    for i in reversed(range(len(steps))):
        raw = steps[i]
        if isinstance(raw, dict) and raw.get("type") == "distill":
            body = {k: v for k, v in raw.items() if k not in ("type", "name")}
            spec = step_type("distill", f"steps[{i}].type").parse(body, f"steps[{i}]").student
            return build_student(ctx, spec, ctx.model) if getattr(spec, "builtin", None) else None
    return None


def export_run(run_dir: str | Path, options: ExportOptions) -> ExportResult:
    """Export the run's final model to ``options.to``, checked on the export step's example.

    Hugging Face's bars and the tracer's warnings are off: the check on the example is what says
    whether the trace holds, and the command prints its own few lines."""
    with quiet_libraries(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return _export_run(Path(run_dir), options)


def _export_run(run_dir: Path, options: ExportOptions) -> ExportResult:
    from slimkit.export.onnx import check_exportable
    from slimkit.export.pt2 import check_pt2_exportable

    path = output_path(run_dir, options)  # a bad --out is named before the model loads
    ctx = run_context(run_dir, options.step, options.trust_code)
    (check_exportable if options.to == "onnx" else check_pt2_exportable)(ctx.model)  # names layers
    settings = options.onnxruntime
    example = export_example(ctx, settings.example_samples)
    made_folder = not path.parent.exists()
    try:
        with atomic_path(path) as tmp:  # renamed onto ``path`` only once the check below passed
            named = tmp.parent / path.name  # in atomic_path's private folder; torch.export wants .pt2
            exported = _write(options, ctx.model, example, named)
            max_abs, rel = runtime_error(ctx.model, exported, example)
            if not rel <= settings.tolerance:
                raise ExportError(
                    f"{options.to}: the exported model's output differs from the PyTorch model's by "
                    f"{rel:.3g} (relative L2; max abs {max_abs:.3g}) on {_samples(example)} train samples, "
                    f"above --tolerance {settings.tolerance:g}; nothing was written"
                )
            os.replace(named, tmp)
    except BaseException:
        if made_folder and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
        raise
    latency = _latency(ctx.model, exported, example, options) if options.repeats else None
    return ExportResult(
        path, options.to, path.stat().st_size, _samples(example), max_abs, rel, settings.tolerance, latency
    )


def _write(options: ExportOptions, model: torch.nn.Module, example: dict, path: Path):
    """Write the file; returns a callable (keyword tensors in, one tensor out) running it."""
    if options.to == "onnx":
        from slimkit.export.onnx import to_onnxruntime

        return to_onnxruntime(model, example, path, threads=options.onnxruntime.threads, opset=options.opset)
    from slimkit.export.pt2 import export_pt2, load_pt2

    export_pt2(model, example, path)
    program, names = load_pt2(path), list(example)
    return lambda **inputs: program(*(inputs[n] for n in names))


def _samples(example: dict) -> int:
    return int(next(iter(example.values())).shape[0])


def _latency(model, exported, example: dict, options: ExportOptions) -> dict[str, float]:
    """Median ms of one call on the example, the two models interleaved (the runner's timer)."""
    from slimkit.metrics.speed import compare_latency

    fns = {options.to: lambda: exported(**example), "pytorch": lambda: model(**example)}
    timed = compare_latency(
        fns,
        warmup=2,
        repeats=options.repeats,
        threads=options.onnxruntime.threads,
        batch_size=_samples(example),
    )
    return {name: timed[name].median_ms for name in fns}
