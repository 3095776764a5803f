"""weight_only: int8 (per channel) or int4 (per group) weights, float activations; RTN or GPTQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.calibration.blocks import by_block_when
from slimkit.calibration.collectors import HessianAccumulator
from slimkit.config import non_negative, one_of, positive_int, require
from slimkit.quant.affine import QSpec, quantize_tensor
from slimkit.quant.base import BlockCalibration
from slimkit.quant.builders import weight_2d
from slimkit.quant.codecs import Info, LayerCodec
from slimkit.quant.gptq import gptq_quantize
from slimkit.quant.method import QuantMethod, register_method
from slimkit.quant.modules import WeightOnlyLinear


@dataclass
class WeightOnlyConfig(BlockCalibration):
    """Weights in ``bits`` (8: per channel; 4: per group), activations stay float.

    ``group_size``: 32, 64 or 128 for 4 bits (null means 128); null for 8 bits.

    ``algorithm``: ``rtn`` (round to nearest) or ``gptq`` (Hessian-based error
    compensation on calibration data, Frantar et al. 2022).

    GPTQ options: ``act_order`` quantizes columns in order of decreasing
    Hessian diagonal (the inputs with the most energy first; groups keep their
    storage order, so the kernel layout is unchanged); ``sequential`` calibrates
    a model with a stack of repeated blocks one block at a time, each block on
    the outputs of the blocks already quantized, holding one block's inputs
    (null: on for causal language models); ``true_sequential`` also takes a
    block's layers in stages (attention q/k/v, output projection, MLP in,
    MLP out), each calibrated on the quantized stages before it.
    """

    bits: int = 4
    group_size: int | None = None
    algorithm: str = "rtn"
    symmetric: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    true_sequential: bool = True

    def __post_init__(self):
        super().__post_init__()
        one_of(self.bits, "bits", (4, 8))
        one_of(self.algorithm, "algorithm", ("rtn", "gptq"))
        non_negative(self.damp, "damp")
        positive_int(self.block_size, "block_size")
        if self.bits == 4:
            self.group_size = 128 if self.group_size is None else self.group_size
            one_of(self.group_size, "group_size", (32, 64, 128))
        else:
            # The int8 weight-only kernel (aten._weight_int8pack_mm) takes one scale per output channel.
            require(self.group_size is None, "group_size", "must be null for 8 bits (per-channel scales)")
            require(
                self.symmetric, "symmetric", "8-bit weight-only is symmetric (the kernel takes no zero point)"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm == "gptq"


def weight_only_codec(cls: type[WeightOnlyLinear]) -> LayerCodec:
    """Save/load of ``cls`` (WeightOnlyLinear or a subclass built from the same four numbers)."""

    def describe(module: WeightOnlyLinear) -> Info:
        return {
            "in": module.in_features,
            "out": module.out_features,
            "bits": module.bits,
            "group_size": module.group_size,
        }

    def rebuild(float_module: nn.Module, info: Info) -> nn.Module:
        return cls(info["in"], info["out"], info["bits"], info["group_size"])

    return LayerCodec(cls, rebuild, describe)


class WeightOnly(QuantMethod):
    name = "weight_only"
    config_type = WeightOnlyConfig
    codecs = (weight_only_codec(WeightOnlyLinear),)

    def supports(self, config: WeightOnlyConfig, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear) and config.bits == 4:
            if module.in_features % config.group_size:
                return f"in_features {module.in_features} is not a multiple of group_size {config.group_size}"
            if module.in_features % 2:
                return "int4 packing needs an even in_features"
            if module.out_features % 16:  # the int4 kernel's packed layout tiles 16 output rows
                return f"out_features {module.out_features} is not a multiple of 16 (int4 kernel tiles)"
        return super().supports(config, module)

    def collectors(self, config: WeightOnlyConfig, module: nn.Module) -> dict[str, Any]:
        return {"hessian": HessianAccumulator(module.in_features)} if config.algorithm == "gptq" else {}

    def build(self, config: WeightOnlyConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        w2d = weight_2d(module)
        if config.bits == 8:
            spec = QSpec(8, True, "channel", 0)
        else:
            spec = QSpec(4, config.symmetric, "group", 0, config.group_size)
        if "hessian" in collectors:
            hessian = collectors["hessian"].hessian()  # a fresh copy: GPTQ may work in it
            q, scale, zero = gptq_quantize(
                w2d, hessian, spec, config.damp, config.block_size, config.act_order, overwrite=True
            )
        else:
            q, scale, zero = quantize_tensor(w2d, spec)
        return WeightOnlyLinear.from_float(module, q, scale, zero, config.bits, config.group_size)

    def calibrates_by_block(self, config: WeightOnlyConfig, model: nn.Module) -> bool:
        return config.algorithm == "gptq" and by_block_when(model, config.sequential)

    def true_sequential(self, config: WeightOnlyConfig) -> bool:
        return config.true_sequential

    def weight_bytes(self, config: WeightOnlyConfig, module: nn.Module) -> float:
        if config.bits == 4:
            n = module.weight.numel()
            return n / 2 + 8.0 * n / config.group_size
        return super().weight_bytes(config, module)


METHOD = register_method(WeightOnly())
