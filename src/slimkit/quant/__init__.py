"""Quantization: int8/int4, post-training (static, dynamic, weight-only RTN/GPTQ/AWQ), QAT, mixed precision.

Typical use::

    from slimkit.quant import quantize_, Int8StaticConfig
    summary = quantize_(model, Int8StaticConfig(overrides={"classifier.*": None}), calibration_data=batches)

or the explicit steps ``prepare_(model, cfg)``, ``calibrate(model, batches)``,
``convert_(model)``. Quantized layers run on integer kernels (PyTorch's
``torch._int_mm`` / int8 and int4 weight-only kernels); transformer encoders
can be exported to ONNX Runtime's int8 kernels with
:func:`slimkit.export.onnx.to_onnxruntime` when :func:`onnx_problem` finds none.

Each method is one file in ``slimkit/quant/methods/`` registered in the method
table (:mod:`slimkit.quant.method`); :func:`method_names` lists them.
"""

from slimkit.quant.api import calibrate, convert_, prepare_, quantize_, unprepare_
from slimkit.quant.callback import QATCallback
from slimkit.quant.config import (
    AWQConfig,
    BF16Config,
    CodebookConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    MixedPrecisionConfig,
    QATConfig,
    WeightOnlyConfig,
    config_from_dict,
)
from slimkit.quant.fold import fold_batchnorm_
from slimkit.quant.method import method_names, onnx_problem
from slimkit.quant.serialize import load_compressed, load_quantized, save_compressed, save_quantized
from slimkit.quant.summary import QuantSummary

__all__ = [
    "AWQConfig",
    "BF16Config",
    "CodebookConfig",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "MixedPrecisionConfig",
    "QATCallback",
    "QATConfig",
    "QuantSummary",
    "WeightOnlyConfig",
    "calibrate",
    "config_from_dict",
    "convert_",
    "fold_batchnorm_",
    "load_compressed",
    "load_quantized",
    "method_names",
    "onnx_problem",
    "prepare_",
    "quantize_",
    "save_compressed",
    "save_quantized",
    "unprepare_",
]
