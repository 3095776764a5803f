"""The ``quantize`` recipe step.

YAML (the method's own fields sit beside ``method``; see :mod:`slimkit.quant.config`)::

    - type: quantize
      method: int8_static            # int8_dynamic | int8_static | weight_only | qat | mixed | bf16
      activation_observer: percentile
      overrides: {"classifier.*": null}
      calibration_samples: 256       # from the train split (methods that calibrate)

    - type: quantize
      method: qat
      weight_bits: 4
      train: {epochs: 2, lr: 0.0005}

    - type: quantize
      method: mixed
      low: {method: weight_only, bits: 4, group_size: 32}
      max_error: 0.01

After the step the model's quantized layers run on integer kernels and the
run's weights file is written by :func:`slimkit.quant.save_quantized`, so the
report's size is that of the packed file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimkit.config import positive_int
from slimkit.errors import ConfigError
from slimkit.quant.api import convert_, prepare_, quantize_
from slimkit.quant.config import METHODS, QATConfig, config_from_dict
from slimkit.quant.export_step import STEP as EXPORT_STEP
from slimkit.quant.serialize import save_quantized
from slimkit.recipes.registry import StepType
from slimkit.train import TrainConfig

_METHOD_FIELDS = sorted({f.name for cls in METHODS.values() for f in dataclasses.fields(cls)})


def _post_init(self) -> None:
    if not isinstance(self.method, str) or self.method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}; got {self.method!r}")
    positive_int(self.calibration_samples, "calibration_samples")
    positive_int(self.calibration_batch_size, "calibration_batch_size")
    given = {name: getattr(self, name) for name in _METHOD_FIELDS if getattr(self, name) is not None}
    allowed = {f.name for f in dataclasses.fields(METHODS[self.method])}
    for name in given:
        if name not in allowed:
            raise ConfigError(
                name, f"is not a setting of method {self.method} (its settings: {', '.join(sorted(allowed))})"
            )
    self.quant = config_from_dict({"method": self.method, **given})
    if self.train is not None and not isinstance(self.quant, QATConfig):
        raise ConfigError("train", "only method qat trains")
    if isinstance(self.train, dict):
        from slimkit.config import from_dict

        self.train = from_dict(TrainConfig, self.train, "train")


QuantizeStepConfig = dataclasses.make_dataclass(
    "QuantizeStepConfig",
    [
        ("method", str),
        ("calibration_samples", int, dataclasses.field(default=256)),
        ("calibration_batch_size", int, dataclasses.field(default=32)),
        ("train", TrainConfig | None, dataclasses.field(default=None)),
    ]
    + [(name, Any, dataclasses.field(default=None)) for name in _METHOD_FIELDS],
    namespace={
        "__post_init__": _post_init,
        "__doc__": "Step settings: ``method`` plus that method's fields.",
    },
)


def run_quantize(ctx, config) -> None:
    quant = config.quant
    if isinstance(quant, QATConfig):
        prepare_(ctx.model, quant)
        result = ctx.train(config.train or TrainConfig(epochs=1, lr=1e-4))
        summary = convert_(ctx.model)
        ctx.notes.update(qat_epochs=len(result.history))
    else:
        needs = any(c is not None and c.needs_calibration for c in (quant, *quant.overrides.values()))
        batches = (
            ctx.calibration_batches(config.calibration_samples, config.calibration_batch_size)
            if needs
            else None
        )
        summary = quantize_(ctx.model, quant, calibration_data=batches, forward=ctx.task.forward)
    ctx.saver = save_quantized
    folded = len(summary.get("folded", {}))
    ctx.notes.update(
        quant_method=quant.method,
        quantized_layers=len(summary["quantized"]),
        kept_float=sorted(summary["skipped"]),
        folded_batchnorms=folded,
    )
    if "analysis" in summary:
        from slimkit.quant.sensitivity import plot_sensitivity

        plot = plot_sensitivity(summary["analysis"], ctx.run_dir / "quant_sensitivity.png")
        # Relative to the run folder (which is renamed into place when the run ends).
        ctx.notes.update(sensitivity_plot=plot.name, mixed_kept=summary["analysis"]["high"])
    ctx.log.info(
        "quantize: %s, %d layers quantized, %d kept float, %d BatchNorms folded",
        quant.method,
        len(summary["quantized"]),
        len(summary["skipped"]),
        folded,
    )


STEPS = {
    "quantize": StepType(
        QuantizeStepConfig,
        run_quantize,
        changes_model=True,
        doc="quantize to int8/int4 (static, dynamic, weight-only RTN/GPTQ, QAT, mixed precision, bf16)",
    ),
    "export": EXPORT_STEP,
}
