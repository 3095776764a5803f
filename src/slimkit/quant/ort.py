"""Run a slimkit-quantized model on ONNX Runtime's int8 kernels.

Why: on this class of CPU (AVX-512 VNNI, 2 threads) ONNX Runtime's
``DynamicQuantizeMatMul`` (MLAS u8s8 VNNI GEMM) together with its graph fusions
(LayerNorm, GELU, attention's MatMul+Softmax) ran the MiniLM encoder fastest of
the runtimes measured (see bench/README.md, "Quantization"); torch.compile with
torchao's int8 and PyTorch's quantized/oneDNN engines were slower.

slimkit still owns the quantization: the int8 codes, per-channel scales,
SmoothQuant factors, kept-float layers and int8 embedding tables come from
:func:`slimkit.quant.quantize_`; export turns each dynamic int8
:class:`~slimkit.quant.modules.QuantLinear` into one ``com.microsoft::DynamicQuantizeMatMul``
node holding those very codes. A *copy* of the model is exported in eval mode
(the TorchScript exporter leaves a model in training mode otherwise, and
dropout would then run), so the given model is left as it was.

Export traces one path through the model: give an example whose attention
mask has padding, or transformers (which skips masking for all-ones masks)
exports a graph that ignores padding.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ModelError
from slimkit.utils.io import atomic_path


class _KeywordWrapper(nn.Module):
    """Positional-to-keyword adapter: the exporter passes inputs positionally."""

    def __init__(self, model: nn.Module, names: list[str], output_fn: Callable[[Any], Any]):
        super().__init__()
        self.model, self.names, self.output_fn = model, names, output_fn

    def forward(self, *args):
        return self.output_fn(self.model(**dict(zip(self.names, args))))


def first_output(outputs: Any) -> torch.Tensor:
    """The main tensor of a model's outputs (``last_hidden_state`` / ``logits`` / a plain tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return next(iter(outputs.values()))
    return outputs[0]


def export_onnx(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    output_fn: Callable[[Any], Any] = first_output,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 17,
) -> Path:
    """Export an eval-mode copy of ``model`` (keyword inputs) to ONNX; returns the path."""
    names = list(example_inputs)
    if dynamic_axes is None:
        # Batch is dynamic for all inputs, sequence length for integer (token) inputs.
        dynamic_axes = {
            n: ({0: "batch", 1: "seq"} if not t.is_floating_point() and t.dim() > 1 else {0: "batch"})
            for n, t in example_inputs.items()
        }
    wrapper = _KeywordWrapper(copy.deepcopy(model), names, output_fn).eval()
    args = tuple(example_inputs[n] for n in names)
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(tmp),
            input_names=names,
            output_names=["output"],
            dynamic_axes={**dynamic_axes, "output": {0: "batch"}},
            opset_version=opset,
            custom_opsets={"com.microsoft": 1},
            dynamo=False,
        )
    return Path(path)


def share_input_quantization(path: str | os.PathLike) -> int:
    """Quantize an activation once for all the int8 MatMuls that read it (attention's Q, K and V).

    Each ``DynamicQuantizeMatMul`` quantizes its own input; where several read
    the same tensor, one ``DynamicQuantizeLinear`` feeds ``MatMulIntegerToFloat``
    nodes instead: the same arithmetic, two fewer passes over the activations
    per attention block. Returns the number of nodes rewritten.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft":
            readers.setdefault(node.input[0], []).append(i)
    replaced: dict[int, list] = {}
    for source, idx in readers.items():
        if len(idx) < 2:
            continue
        tag = f"{source}_shared_q"
        quant = helper.make_node(
            "DynamicQuantizeLinear", [source], [f"{tag}", f"{tag}_scale", f"{tag}_zero"], name=f"{tag}_node"
        )
        for n, i in enumerate(idx):
            node = nodes[i]
            a, b, b_scale, b_zero, *bias = node.input
            inputs = [tag, b, f"{tag}_scale", b_scale, f"{tag}_zero", b_zero, *bias]
            new = helper.make_node(
                "MatMulIntegerToFloat",
                inputs,
                list(node.output),
                name=f"{node.name}_shared",
                domain="com.microsoft",
            )
            replaced[i] = [quant, new] if n == 0 else [new]
    if not replaced:
        return 0
    order = [new for i, node in enumerate(nodes) for new in replaced.get(i, [node])]
    del model.graph.node[:]
    model.graph.node.extend(order)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return len(replaced)


def ort_session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads would keep both cores busy after each call and slow every
    # other runtime in the same process (measured: fp32 PyTorch ran 2x slower beside them).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session behind ``nn.Module``'s call: keyword tensors in, one tensor out."""

    def __init__(self, path: str | os.PathLike, threads: int = 2):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"ONNX model not found: {self.path}")
        self.session = ort_session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args, **inputs) -> torch.Tensor:
        inputs.update(zip(self.input_names, args))
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ModelError(f"{self.path.name}: missing inputs {', '.join(missing)}")
        feeds = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def file_size(self) -> int:
        return self.path.stat().st_size


def to_onnxruntime(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    threads: int = 2,
    output_fn: Callable[[Any], Any] = first_output,
) -> OrtModule:
    """Export ``model`` (float or slimkit-quantized) and load it in an ONNX Runtime session."""
    export_onnx(model, example_inputs, path, output_fn)
    share_input_quantization(path)
    return OrtModule(path, threads)
