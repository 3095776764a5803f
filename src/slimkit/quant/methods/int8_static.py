"""int8_static: int8 weights and activations, the activation ranges fixed by calibration on data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.config import in_range, one_of, require
from slimkit.quant.affine import QSpec
from slimkit.quant.base import WEIGHT_OBSERVERS, QuantConfig
from slimkit.quant.builders import int8_layer, smoothed_int8_weight, smoothquant_collectors
from slimkit.quant.codecs import INT8_CODECS
from slimkit.quant.method import QuantMethod, register_method
from slimkit.quant.observers import OBSERVERS, Observer, make_observer
from slimkit.train.distributed import DistEnv


@dataclass
class Int8StaticConfig(QuantConfig):
    """int8 weights and activations; activation ranges fixed by calibration on data.

    ``fold_batchnorm``: a Conv2d read only by a BatchNorm2d takes the BatchNorm's
    affine map into its weights before they are quantized (the BatchNorm becomes
    an identity), found on a traced forward pass of the first calibration batch.
    """

    activation_observer: str = "minmax"
    activation_symmetric: bool = False
    percentile: float = 99.99
    weight_observer: str = "minmax"
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5
    fold_batchnorm: bool = True

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.fold_batchnorm, bool), "fold_batchnorm", "must be true or false")
        one_of(self.activation_observer, "activation_observer", OBSERVERS)
        one_of(self.weight_observer, "weight_observer", WEIGHT_OBSERVERS)
        in_range(self.percentile, "percentile", 50.0, 100.0)
        in_range(self.smoothquant_alpha, "smoothquant_alpha", 0.0, 1.0)

    @property
    def needs_calibration(self) -> bool:
        return True


class ChannelRanges:
    """Per-input-channel ranges: the observer sees the input as rows ``[-1, channels]``."""

    def __init__(self, observer: Observer):
        self.observer = observer

    @property
    def batches(self) -> int:
        return self.observer.batches

    def update(self, x: torch.Tensor) -> None:
        self.observer.update(x.reshape(-1, x.shape[-1]))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.observer.range()

    def all_reduce_(self, env: DistEnv | None) -> None:
        self.observer.all_reduce_(env)


class Int8Static(QuantMethod):
    name = "int8_static"
    config_type = Int8StaticConfig
    layer_types = (nn.Linear, nn.Conv2d)
    codecs = INT8_CODECS
    takes_folded_conv = True

    def collectors(self, config: Int8StaticConfig, module: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if config.smoothquant and isinstance(module, nn.Linear):
            # Per-channel ranges: the per-tensor range of x / s follows exactly once s is known.
            spec = QSpec(8, config.activation_symmetric, "channel", 1)
            out["act_channels"] = ChannelRanges(make_observer("minmax", spec))
        else:
            spec = QSpec(8, config.activation_symmetric, "tensor")
            out["act"] = make_observer(config.activation_observer, spec, percentile=config.percentile)
        return out | smoothquant_collectors(config, module)

    def build(self, config: Int8StaticConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        q, w_scale, in_scale, alpha = smoothed_int8_weight(module, config, collectors)
        x_qparams = _activation_qparams(config, collectors, in_scale)
        return int8_layer(module, q, w_scale, "static", "tensor", x_qparams, in_scale, alpha)

    def fold_batchnorm(self, config: Int8StaticConfig) -> bool:
        return config.fold_batchnorm

    def onnx_problem(self, config: Int8StaticConfig) -> tuple[str, str] | None:
        return None  # QDQ units that ONNX Runtime fuses into its int8 kernels (slimkit.export.qdq)


def _activation_qparams(config: Int8StaticConfig, collectors: dict[str, Any], in_scale) -> tuple:
    if "act_channels" in collectors:
        lo, hi = collectors["act_channels"].range()
        # Dividing channel j by s_j > 0 scales its range by in_scale_j; the tensor range is the extreme.
        obs = make_observer("minmax", QSpec(8, config.activation_symmetric, "tensor"))
        obs.lo, obs.hi = (lo * in_scale).min(), (hi * in_scale).max()
        return obs.qparams()
    return collectors["act"].qparams()


METHOD = register_method(Int8Static())
