"""Quantization: int8/int4, post-training (static, dynamic, weight-only RTN/GPTQ), QAT, mixed precision.

Typical use::

    from slimkit.quant import quantize_, Int8StaticConfig
    quantize_(model, Int8StaticConfig(overrides={"classifier.*": None}), calibration_data=batches)

or the explicit steps ``prepare_(model, cfg)``, ``calibrate(model, batches)``,
``convert_(model)``. Quantized layers run on integer kernels (PyTorch's
``torch._int_mm`` / int8 and int4 weight-only kernels); transformer encoders
can be exported to ONNX Runtime's int8 kernels with :func:`to_onnxruntime`.
"""

from slimkit.quant.affine import QSpec, dequantize, fake_quantize, pack_int4, quantize, sqnr_db, unpack_int4
from slimkit.quant.api import calibrate, convert_, is_prepared, prepare_, quantize_, unprepare_
from slimkit.quant.config import (
    BF16Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    MixedPrecisionConfig,
    QATConfig,
    WeightOnlyConfig,
    config_from_dict,
)
from slimkit.quant.fold import fold_batchnorm_
from slimkit.quant.qat import QATCallback
from slimkit.quant.serialize import load_quantized, save_quantized

__all__ = [
    "BF16Config",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "MixedPrecisionConfig",
    "QATCallback",
    "QATConfig",
    "QSpec",
    "WeightOnlyConfig",
    "calibrate",
    "config_from_dict",
    "convert_",
    "dequantize",
    "fake_quantize",
    "fold_batchnorm_",
    "is_prepared",
    "load_quantized",
    "pack_int4",
    "prepare_",
    "quantize",
    "quantize_",
    "save_quantized",
    "sqnr_db",
    "unpack_int4",
    "unprepare_",
]
