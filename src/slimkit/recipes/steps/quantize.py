"""The ``quantize`` step: one quantization method, written as a key naming it.

YAML (the keys are the quant method table's names, so a newly registered method is a new key)::

    - type: quantize
      int8_static: {activation_observer: percentile, overrides: {"classifier.*": null}}
      calibration_samples: 256       # from the train split (methods that calibrate)

    - type: quantize
      qat: {weight_bits: 4}
      train: {epochs: 2, lr: 0.0005}  # qat only
      # or, instead of train, fine_tune: false: convert right away (codebook: centroids as clustered)

    - type: quantize
      mixed: {low: {method: weight_only, bits: 4, group_size: 32}, max_error: 0.01}

After the step the quantized layers run on integer kernels and the run's
weights file is written by :func:`slimkit.quant.save_quantized`, so the
report's size is that of the packed file. A causal LM whose only quantized
layers are bf16 has no integer layer: it is kept as a plain bfloat16 Hugging
Face folder instead (``hf_folder``, :mod:`slimkit.models.hf_folder`).

Under ``torchrun --nproc_per_node=N slimkit run ...`` each process calibrates
on every N-th of the calibration batches (``calibration_samples`` is the total,
so at least N batches of 32) and the statistics are summed across the
processes (:mod:`slimkit.quant.distributed`): the layers are those one process
builds on all the batches; only rank 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from slimkit.config import from_dict, positive_int, require, to_dict
from slimkit.errors import ConfigError
from slimkit.models.causal_lm import is_causal_lm
from slimkit.quant import (
    QATCallback,
    config_from_dict,
    convert_,
    load_quantized,
    method_names,
    quantize_,
    save_quantized,
)
from slimkit.quant.codebook import SharedWeights
from slimkit.quant.method import method_for
from slimkit.quant.modules import BF16Linear
from slimkit.quant.serialize import load_compressed, quantized_layers, save_compressed
from slimkit.recipes.steps.base import RunContext, StepResult, register_step, under, without
from slimkit.recipes.steps.saving import HF_FOLDER, Saver, register_format
from slimkit.train import TrainConfig

SHARED = ("calibration_samples", "train", "fine_tune")

# How the run keeps a quantized model for --resume: rebuilt on the float model before the step.
register_format("quantized", save_quantized, load_quantized)
# Shared weights (codebook) are stored entropy-coded: their indices and gaps compress well.
register_format("compressed", save_compressed, load_compressed, file_name="model.slim")


def _trains(quant: Any) -> bool:
    """Whether the method trains (qat): ``quantize_`` only prepares, then training, then ``convert_``."""
    return method_for(quant).trains


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=1, lr=1e-4)


@dataclass(frozen=True)
class QuantizeStep:
    quant: Any  # the library's config; in YAML under the key of its method (``int8_static: {...}``)
    calibration_samples: int = 256
    train: TrainConfig | None = None  # methods that train (qat); default: 1 epoch at lr 1e-4
    fine_tune: bool = True  # false: a method that trains converts right after preparing (no training)

    def __post_init__(self):
        positive_int(self.calibration_samples, "calibration_samples")
        require(
            self.train is None or _trains(self.quant),
            "train",
            f"{self.quant.method} does not train (only methods that train, such as qat, take train)",
        )
        require(isinstance(self.fine_tune, bool), "fine_tune", "must be true or false")
        require(
            self.fine_tune or (self.train is None and _trains(self.quant)),
            "fine_tune",
            "false only for a method that trains (qat, codebook), and then without train settings",
        )

    @classmethod
    def from_yaml(cls, body: dict[str, Any], path: str) -> QuantizeStep:
        names = method_names()
        example = "int8_static" if "int8_static" in names else names[0]
        if "method" in body:
            raise ConfigError(
                f"{path}.method",
                f"write the method as a key, e.g. '{example}: {{activation_observer: percentile}}'",
            )
        for key in body:
            if key not in names and key not in SHARED:
                raise ConfigError(
                    f"{path}.{key}",
                    f"unknown key: a quantize step takes one method key ({', '.join(names)}) holding that "
                    f"method's settings, e.g. '{example}: {{{key}: ...}}', and {' and '.join(SHARED)}",
                )
        given = [k for k in body if k in names]
        require(
            len(given) == 1,
            f"{path}.{given[-1]}" if given else path,
            f"give exactly one quantization method as a key (one of: {', '.join(names)})",
        )
        quant = _method_config(given[0], body[given[0]], f"{path}.{given[0]}")
        train = body.get("train")
        if train is not None:
            train = from_dict(TrainConfig, train, f"{path}.train")
        elif _trains(quant) and body.get("fine_tune", True) is not False:
            train = _default_train()
        try:
            given = {k: body[k] for k in ("calibration_samples", "fine_tune") if k in body}
            return cls(quant, **given, train=train)
        except ConfigError as err:
            raise err.prefixed(path) from None

    def to_yaml(self) -> dict[str, Any]:
        out = {self.quant.method: without(_plain(self.quant), "method")}
        out["calibration_samples"] = self.calibration_samples
        if self.train is not None:
            out["train"] = to_dict(self.train)
        if not self.fine_tune:
            out["fine_tune"] = False
        return out


def _method_config(name: str, settings: Any, path: str) -> Any:
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise ConfigError(path, f"must be a mapping of {name} settings, got {type(settings).__name__}")
    require(
        "method" not in settings, f"{path}.method", f"the key '{name}' names the method; leave 'method' out"
    )
    try:
        return config_from_dict({"method": name, **settings})
    except ConfigError as err:
        raise err.prefixed(path) from None


def _plain(value: Any) -> Any:
    """Plain data of a quant config; nested configs (overrides, mixed low/high) keep their ``method``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        method = getattr(value, "method", None)
        return {"method": method, **fields} if isinstance(method, str) else fields
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _needs_calibration(quant: Any) -> bool:
    return any(c is not None and c.needs_calibration for c in (quant, *quant.overrides.values()))


@register_step(
    "quantize",
    config=QuantizeStep,
    doc="quantize to int8/int4 (static, dynamic, weight-only RTN/GPTQ, QAT, mixed precision, bf16)",
)
def run_quantize(ctx: RunContext, cfg: QuantizeStep) -> StepResult:
    model, quant = ctx.model, cfg.quant
    notes: dict[str, Any] = {}
    # Under torchrun each process takes its share; quantize_ sums the statistics across them.
    batches = (
        ctx.calibration_batches(cfg.calibration_samples, shard=True) if _needs_calibration(quant) else None
    )
    with under(quant.method):
        summary = quantize_(model, quant, calibration_data=batches, forward=ctx.task.forward)
        if _trains(quant):  # quantize_ only prepared (fake-quantized layers): train, then convert
            if cfg.fine_tune:
                # The callback (already prepared: it only keeps the observers' ranges in checkpoints).
                trained = ctx.train(model, cfg.train or _default_train(), callbacks=[QATCallback(quant)])
                notes["qat_epochs"] = len(trained.history)
            summary = convert_(model)
    notes.update(
        quant_method=quant.method,
        quantized_layers=len(summary.quantized),
        kept_float=sorted(summary.skipped),
        folded_batchnorms=len(summary.folded),
        kernels=summary.kernels,
    )
    if summary.analysis is not None:
        from slimkit.quant.sensitivity import plot_sensitivity

        plot = plot_sensitivity(summary.analysis, ctx.run_dir / "quant_sensitivity.png")
        # Relative to the run folder (which is renamed into place when the run ends).
        notes.update(sensitivity_plot=plot.name, mixed_kept=summary.analysis["high"])
    ctx.log.info(
        "quantize: %s, %d layers quantized, %d kept float, %d BatchNorms folded",
        quant.method,
        len(summary.quantized),
        len(summary.skipped),
        len(summary.folded),
    )
    for path, choice in summary.kernels.items():  # chosen by the processor (slimkit.utils.dispatch)
        ctx.log.info("quantize: %s runs on %s", path, choice)
    return StepResult(model, saver=_saver(model), notes=notes)


def _saver(model: Any) -> Saver:
    """A causal LM with bf16 layers only: a plain (bfloat16) Hugging Face folder; shared weights:
    the entropy-coded file; else the packed file."""
    layers = quantized_layers(model)
    if is_causal_lm(model) and layers and all(isinstance(m, BF16Linear) for m, _ in layers.values()):
        return HF_FOLDER.saver
    if any(isinstance(m, SharedWeights) for m, _ in layers.values()):
        return save_compressed
    return save_quantized
