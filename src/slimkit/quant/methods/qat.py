"""qat: quantization-aware training with fake-quantized layers, then the same int8 layers as PTQ.

``prepare_`` swaps each selected Linear/Conv2d for a fake-quantized one
(:mod:`slimkit.quant.qat`) that keeps the very same parameters; the model is
trained (:class:`~slimkit.quant.callback.QATCallback` in a Trainer), and
``convert_`` builds integer layers with exactly the grid training used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.config import in_range, one_of, require
from slimkit.quant.affine import QSpec, quantize_tensor
from slimkit.quant.base import QuantConfig
from slimkit.quant.builders import int8_layer, weight_2d
from slimkit.quant.codecs import INT8_CODECS
from slimkit.quant.method import QuantMethod, register_method
from slimkit.quant.qat import QATConv2d, QATLinear, to_float, to_qat


@dataclass
class QATConfig(QuantConfig):
    """Quantization-aware training: fake-quantized weights (and activations) while training."""

    weight_bits: int = 8
    activation_bits: int | None = 8
    weight_granularity: str = "channel"
    activation_observer: str = "moving_average"
    momentum: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        one_of(self.weight_bits, "weight_bits", (4, 8))
        require(self.activation_bits in (None, 8), "activation_bits", "must be 8 or null (float activations)")
        one_of(self.weight_granularity, "weight_granularity", ("tensor", "channel"))
        one_of(self.activation_observer, "activation_observer", ("minmax", "moving_average"))
        in_range(self.momentum, "momentum", 0.0, 1.0)


class QAT(QuantMethod):
    name = "qat"
    config_type = QATConfig
    layer_types = (nn.Linear, nn.Conv2d)
    codecs = INT8_CODECS
    trains = True

    def prepare_layer(self, config: QATConfig, module: nn.Module) -> nn.Module:
        return to_qat(module, config)

    def unprepare_layer(self, config: QATConfig, module: nn.Module) -> nn.Module | None:
        return to_float(module) if isinstance(module, (QATLinear, QATConv2d)) else None

    def build(self, config: QATConfig, module: nn.Module, collectors: dict[str, Any]) -> nn.Module:
        """Integer layer with exactly the grid the network was trained on."""
        if not isinstance(module, (QATLinear, QATConv2d)):
            raise TypeError(
                f"qat converts fake-quantized layers (prepare_ first), not {type(module).__name__}"
            )
        w2d = weight_2d(module)
        spec = module.weight_spec
        w_spec = QSpec(spec.bits, True, spec.granularity, 0)
        q, scale, _ = quantize_tensor(w2d, w_spec)
        scale = scale.expand(w2d.shape[0]) if w_spec.granularity == "tensor" else scale
        observer = module.act_observer
        mode = "static" if observer is not None and observer.lo is not None else "dynamic"
        x_qparams = observer.qparams() if mode == "static" else None
        granularity = "tensor" if isinstance(module, nn.Conv2d) else "token"
        mod = int8_layer(module, q, scale, mode, granularity, x_qparams)
        mod.weight_bits = spec.bits
        return mod

    def onnx_problem(self, config: QATConfig) -> tuple[str, str] | None:
        if config.activation_bits is None:  # float activations convert to dynamic per-token layers
            return "activation_bits", "must be 8: ONNX Runtime's int8 kernels take calibrated activations"
        return None  # static int8 layers: QDQ units (slimkit.export.qdq)


METHOD = register_method(QAT())
