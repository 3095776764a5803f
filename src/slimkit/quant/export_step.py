"""The ``export`` recipe step: the model from here on runs in ONNX Runtime.

YAML::

    - type: export
      runtime: onnxruntime   # the only runtime so far
      threads: 2             # the session's intra-op threads
      example_samples: 8     # train samples traced for export (text: padded, see below)

The step exports the current model (float or slimkit-quantized; dynamic int8
layers become ONNX Runtime's int8 MatMuls, attention its fused kernel, see
:mod:`slimkit.export.onnx`) and replaces it by an :class:`~slimkit.export.onnx.OrtModule`,
so the report's row is measured on ONNX Runtime: task metrics, file size (the
``.onnx`` file), latency beside every earlier step. An exported model cannot
be trained or changed any more, so ``export`` must be the recipe's last step.
A ``quantize`` step before it whose layers ONNX Runtime cannot run (int8_static,
qat, bf16, or per-token activations) fails the recipe's validation, before any
step runs.
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimkit.config import one_of, positive_int
from slimkit.errors import ConfigError
from slimkit.quant.config import (
    BF16Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    MixedPrecisionConfig,
    QATConfig,
)
from slimkit.recipes.registry import StepType
from slimkit.utils.io import atomic_path

RUNTIMES = ("onnxruntime",)
ONNX_NAME = "model.onnx"


@dataclass
class ExportStepConfig:
    runtime: str = "onnxruntime"
    threads: int = 2
    example_samples: int = 8

    def __post_init__(self):
        one_of(self.runtime, "runtime", RUNTIMES)
        positive_int(self.threads, "threads")
        positive_int(self.example_samples, "example_samples")


def export_example(ctx, samples: int) -> dict[str, torch.Tensor]:
    """Model inputs from the train split, by keyword, with padding in them (text) so masking is traced."""
    from slimkit.batch import model_inputs
    from slimkit.export.onnx import with_padding

    batch = ctx.calibration_batches(samples, samples)[0]
    if isinstance(batch, dict):
        return with_padding(model_inputs(batch))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    name = next(iter(inspect.signature(ctx.model.forward).parameters))  # export passes inputs by keyword
    return {name: x}


def save_onnx(model, path: Path) -> int:
    """Write the exported model's ``.onnx`` file to ``path`` (the runner's saver); returns bytes."""
    path = Path(path)
    if path.resolve() != model.path.resolve():
        with atomic_path(path) as tmp:
            shutil.copyfile(model.path, tmp)
    return path.stat().st_size


def ort_problem(quant: Any) -> tuple[str, str] | None:
    """``(field, why)`` if layers quantized by ``quant`` could have no ONNX Runtime form, else None."""
    if isinstance(quant, Int8DynamicConfig) and quant.activation_granularity != "tensor":
        return (
            "activation_granularity",
            "must be tensor: ONNX Runtime's int8 kernels take one activation scale",
        )
    if isinstance(quant, (Int8StaticConfig, QATConfig, BF16Config)):
        return "method", f"{quant.method} layers have no ONNX Runtime form; use int8_dynamic or weight_only"
    if isinstance(quant, MixedPrecisionConfig):
        for key in ("low", "high"):  # both parsed into configs by MixedPrecisionConfig
            part = getattr(quant, key)
            if part is not None and (found := ort_problem(part)):
                return f"{key}.{found[0]}", found[1]
    for pattern, override in getattr(quant, "overrides", {}).items():
        if override is not None and (found := ort_problem(override)):
            return f"overrides.{pattern}.{found[0]}", found[1]
    return None


def check_quantize_steps(earlier: list, path: str) -> None:
    """Fail at validation, not after hours of earlier steps, when a quantize step cannot be exported."""
    for i, step in enumerate(earlier):
        if step.type == "quantize" and (found := ort_problem(step.config.quant)):
            raise ConfigError(f"steps[{i}].{found[0]}", f"{found[1]} ({path} exports to onnxruntime)")


def run_export(ctx, config: ExportStepConfig) -> None:
    from slimkit.export.onnx import to_onnxruntime

    example = export_example(ctx, config.example_samples)
    path = ctx.run_dir / ONNX_NAME
    ctx.model = to_onnxruntime(ctx.model, example, path, threads=config.threads)
    ctx.saver, ctx.weights_name = save_onnx, ONNX_NAME
    ctx.notes.update(runtime=config.runtime, onnx_file=ONNX_NAME)
    ctx.log.info("export: %s, %d bytes", path.name, path.stat().st_size)


STEP = StepType(
    ExportStepConfig,
    run_export,
    changes_model=True,
    last_only=True,
    check_before=check_quantize_steps,
    doc="export to ONNX Runtime (int8 kernels, fused attention); must be the last step",
)
