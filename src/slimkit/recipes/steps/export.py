"""The ``export`` step: from here on the model runs in ONNX Runtime. It must be the last step.

YAML (the runtime is the key; ``onnxruntime`` is the only one so far and the default)::

    - type: export
      onnxruntime: {threads: 2, example_samples: 8, tolerance: 0.1}

The step exports the current model (float, pruned, distilled or slimkit-quantized:
dynamic int8 layers become ONNX Runtime's int8 MatMuls, static int8 ones QDQ units
fused into ``QLinearConv``/``QGemm``, weight-only int4/int8 ``MatMulNBits``,
attention its fused kernel, see :mod:`slimkit.export`), runs the export on the
traced example and fails if its output is further than ``tolerance`` (relative L2)
from the PyTorch model's (the error is in the row's notes), and replaces the model
by an ``OrtModule``, so the
report's row is measured on ONNX Runtime: task metrics, file size (the
``.onnx`` file), latency beside every earlier step. A ``quantize`` step before
it whose layers ONNX Runtime cannot run fails the recipe's validation, before
any step runs, naming that step's field (``steps[1].int8_dynamic.activation_granularity``).
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from slimkit.batch import model_inputs
from slimkit.config import in_range, positive_int
from slimkit.errors import ConfigError, ModelError
from slimkit.quant import onnx_problem
from slimkit.recipes.steps.base import RunContext, StepResult, moved_under, register_step
from slimkit.recipes.steps.saving import SavedModel, register_format
from slimkit.utils import dispatch
from slimkit.utils.io import atomic_path

ONNX_NAME = "model.onnx"


@dataclass(frozen=True)
class OnnxRuntimeExport:
    threads: int = 2  # the session's intra-op threads
    example_samples: int = 8  # train samples traced for export (text: with padding, see with_padding)
    # The largest relative L2 error of ONNX Runtime's output against the PyTorch model on the traced
    # example: int8 layers round activations in ONNX Runtime's own kernels (measured below 0.05 on
    # the conformance table's models); beyond it the export is wrong and the step fails.
    tolerance: float = 0.1

    def __post_init__(self):
        positive_int(self.threads, "threads")
        positive_int(self.example_samples, "example_samples")
        in_range(self.tolerance, "tolerance", 0.0, 1.0)


@dataclass(frozen=True)
class ExportStep:
    onnxruntime: OnnxRuntimeExport = field(default_factory=OnnxRuntimeExport)

    MOVED: ClassVar[dict[str, str]] = {
        "runtime": "write the runtime as a key, e.g. 'onnxruntime: {threads: 2}'",
        **moved_under("onnxruntime", ["threads", "example_samples", "tolerance"], "ONNX Runtime settings"),
    }


def check_quantize_steps(earlier: list, path: str) -> None:
    """Fail at validation, not after hours of earlier steps, when a quantize step cannot be exported."""
    for i, step in enumerate(earlier):
        quant = getattr(step.config, "quant", None) if step.type == "quantize" else None
        if quant is not None and (found := onnx_problem(quant)):
            where, why = found
            # "method" is the whole method: in a recipe that is the key naming it.
            key = quant.method if where in ("", "method") else f"{quant.method}.{where}"
            raise ConfigError(f"steps[{i}].{key}", f"{why} ({path} exports to onnxruntime)")


def export_example(ctx: RunContext, samples: int) -> dict[str, torch.Tensor]:
    """Model inputs from the train split, by keyword, with padding in them (text) so masking is traced."""
    from slimkit.export.onnx import with_padding

    batch = ctx.calibration_batches(samples, samples)[0]
    if isinstance(batch, dict):
        return with_padding(model_inputs(batch))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    name = next(iter(inspect.signature(ctx.model.forward).parameters))  # export passes inputs by keyword
    return {name: x}


def save_onnx(model: Any, path: Path) -> int:
    """Write the exported model's ``.onnx`` file to ``path`` (the run's saver); returns bytes."""
    path = Path(path)
    if path.resolve() != model.path.resolve():
        with atomic_path(path) as tmp:
            shutil.copyfile(model.path, tmp)
    return path.stat().st_size


def open_onnx(model: Any, path: Path, threads: int = 2) -> Any:
    """An ONNX Runtime model on a saved ``.onnx`` file (``model``, the PyTorch one, is not needed)."""
    from slimkit.export.onnx import OrtModule

    return OrtModule(path, threads)


register_format("onnx", save_onnx, open_onnx)


def restore_export(ctx: RunContext, cfg: ExportStep, saved: SavedModel) -> Any:
    """--resume: the kept ``.onnx`` file goes back into the run folder and opens as the step left it."""
    path = ctx.run_dir / ONNX_NAME
    with atomic_path(path) as tmp:
        shutil.copyfile(saved.path, tmp)
    return open_onnx(ctx.model, path, cfg.onnxruntime.threads)


def runtime_error(
    model: torch.nn.Module, exported: Any, example: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(max abs difference, relative L2 error) of the exported model's output against ``model``'s on
    ``example``; ``model`` runs in eval mode, its int8 layers exactly (:func:`dispatch.exact_int8`:
    the codes the export carries, not a CPU's 7-bit approximation), and is left as it was. An output
    of another shape is infinitely far."""
    from slimkit.batch import first_output
    from slimkit.metrics.modes import eval_mode

    with eval_mode(model), torch.no_grad(), dispatch.exact_int8():  # the codes the export carries, exactly
        ref = first_output(model(**example)).float()
    out = exported(**example).float()
    if out.shape != ref.shape:
        return float("inf"), float("inf")
    return float((out - ref).abs().max()), float((out - ref).norm() / ref.norm().clamp_min(1e-12))


@register_step(
    "export",
    config=ExportStep,
    doc="export to ONNX Runtime (int8 kernels, fused attention); must be the last step",
    last_only=True,
    check_before=check_quantize_steps,
    restore=restore_export,
)
def run_export(ctx: RunContext, cfg: ExportStep) -> StepResult:
    from slimkit.export.onnx import to_onnxruntime  # onnx/onnxruntime load only when a recipe exports

    settings = cfg.onnxruntime
    example = export_example(ctx, settings.example_samples)
    path = ctx.run_dir / ONNX_NAME
    model = to_onnxruntime(ctx.model, example, path, threads=settings.threads)
    error = runtime_error(ctx.model, model, example)[1]
    ctx.log.info(
        "export: %s, %d bytes, relative error vs PyTorch %.2e", path.name, path.stat().st_size, error
    )
    if not error <= settings.tolerance:
        raise ModelError(
            f"export: ONNX Runtime's output differs from the PyTorch model's by {error:.3g} (relative L2) "
            f"on the traced example, above onnxruntime.tolerance {settings.tolerance:g}"
        )
    notes = {
        "runtime": "onnxruntime",
        "onnx_file": ONNX_NAME,
        "ort_int8": dispatch.ort_int8().line(),
        "onnx_vs_pytorch_error": round(error, 6),
    }
    return StepResult(model, saver=save_onnx, weights_name=ONNX_NAME, notes=notes)
