"""Export: models leave PyTorch for other runtimes (ONNX Runtime today), checked there.

Shared machinery below the techniques: it exports float models and any layer
that knows its own ONNX form (quantized layers carry an ``onnx_problem()``
method and a symbolic export), without importing a technique.
"""

from slimkit.export.onnx import OrtModule, check_exportable, export_onnx, to_onnxruntime, with_padding

__all__ = ["OrtModule", "check_exportable", "export_onnx", "to_onnxruntime", "with_padding"]
