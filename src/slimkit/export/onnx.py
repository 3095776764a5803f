"""Export a model (float or slimkit-quantized) to ONNX and run it on ONNX Runtime's kernels.

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
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.batch import first_output
from slimkit.errors import ModelError
from slimkit.utils import dispatch
from slimkit.utils.io import atomic_path


class _KeywordWrapper(nn.Module):
    """Positional-to-keyword adapter: the exporter passes inputs positionally."""

    def __init__(self, model: nn.Module, names: list[str], output_fn: Callable[[Any], Any]):
        super().__init__()
        self.model, self.names, self.output_fn = model, names, output_fn

    def forward(self, *args):
        return self.output_fn(self.model(**dict(zip(self.names, args))))


def _export_copy(model: nn.Module) -> nn.Module:
    """A copy to trace; Hugging Face models get slimkit's exportable attention in it.

    Why: the exporter turns ``scaled_dot_product_attention`` into a graph that
    guards every softmax against NaN rows (``IsNaN`` + ``Where`` over the full
    batch x heads x seq x seq scores: on MiniLM at 64 x 128 tokens a fifth of
    ONNX Runtime's time), and plain ("eager") attention exports as separate
    transposes, MatMuls, mask add and softmax. :func:`_onnx_attention` exports
    instead as one ``com.microsoft::MultiHeadAttention`` node, ONNX Runtime's
    fused CPU kernel, which does the same arithmetic without the copies.
    """
    clone = copy.deepcopy(model)
    hf = next((m for m in clone.modules() if callable(getattr(m, "set_attn_implementation", None))), None)
    if hf is not None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        AttentionInterface.register(_ATTENTION, _onnx_attention)
        # The additive float mask [batch, 1, query, key] that MultiHeadAttention takes as attention_bias.
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTENTION, eager_mask)
        hf.set_attn_implementation(_ATTENTION)
    return clone


_ATTENTION = "slimkit_onnx"


def _attention_math(q, k, v, bias, num_heads: int, scale: float) -> torch.Tensor:
    """Softmax attention on ``[batch, seq, heads * dim]`` tensors; ``bias`` is added to the scores."""

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    out = scores.softmax(-1) @ heads(v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class _MultiHeadAttention(torch.autograd.Function):
    """Exported as ``com.microsoft::MultiHeadAttention`` (inputs ``[batch, seq, heads * dim]``)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int, scale: float):
        return _attention_math(q, k, v, bias, num_heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads, scale):
        absent = g.op("prim::Constant")
        absent.setType(torch._C.OptionalType.ofTensor())
        bias = absent if bias is None or bias.node().mustBeNone() else bias
        # Inputs: query, key, value, packed projection bias, key padding mask, attention bias.
        out = g.op(
            "com.microsoft::MultiHeadAttention",
            q, k, v, absent, absent, bias,
            num_heads_i=num_heads,
            scale_f=scale,
        )  # fmt: skip
        out.setType(q.type())
        return out


def _onnx_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (``[batch, heads, seq, dim]`` in, ``[batch, seq, heads, dim]`` out)."""
    batch, _, seq, dim = query.shape
    heads = int(query.shape[1])  # a graph attribute, so a constant (batch and seq stay dynamic)
    scale = float(scaling if scaling is not None else dim**-0.5)

    def merge(t: torch.Tensor) -> torch.Tensor:  # the transposes cancel the model's own in the graph
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    if key.shape[1] != heads:  # grouped KV heads: MultiHeadAttention wants as many as the queries
        key, value = (t.repeat_interleave(heads // int(t.shape[1]), dim=1) for t in (key, value))
    if attention_mask is None and getattr(module, "is_causal", False):
        kv = key.shape[2]
        keep = torch.ones(seq, kv, dtype=torch.bool).tril(kv - seq)
        attention_mask = torch.zeros(1, 1, seq, kv).masked_fill(~keep, torch.finfo(query.dtype).min)
    q, k, v = merge(query), merge(key), merge(value)
    out = _MultiHeadAttention.apply(q, k, v, attention_mask, heads, scale)
    return out.reshape(batch, seq, heads, -1), None


def export_onnx(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    output_fn: Callable[[Any], Any] = first_output,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 17,
) -> Path:
    """Export an eval-mode copy of ``model`` (keyword inputs) to ONNX; returns the path."""
    check_exportable(model)
    names = list(example_inputs)
    if dynamic_axes is None:
        # Batch is dynamic for all inputs, sequence length for integer (token) inputs.
        dynamic_axes = {
            n: ({0: "batch", 1: "seq"} if not t.is_floating_point() and t.dim() > 1 else {0: "batch"})
            for n, t in example_inputs.items()
        }
    wrapper = _KeywordWrapper(_export_copy(model), names, output_fn).eval()
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


# Input positions of the int8 weights, their scales and zero points in ONNX Runtime's int8 MatMuls.
_WEIGHT_INPUTS = {"DynamicQuantizeMatMul": (1, 2, 3), "MatMulIntegerToFloat": (1, 3, 5)}


def adapt_int8_weights(path: str | os.PathLike, mode: str | None = None) -> int:
    """Rewrite the int8 MatMuls' weights for the CPU's GEMM (``mode``: :func:`dispatch.ort_int8`'s).

    Why: without VNNI, ONNX Runtime's u8 x s8 GEMM adds pairs of products in int16 with
    saturation, which cost STS-B points on an AVX2 machine. ``reduce_range`` (ORT's documented
    fix) halves the codes to 7 bits (scale doubled), so no pair can saturate; ``u8u8`` stores the
    same codes as unsigned with zero point 128 (exact, on a slower kernel); ``u8s8`` leaves the
    graph as it is. Returns the number of MatMuls rewritten.
    """
    mode = mode or dispatch.ort_int8().kernel
    if mode == "u8s8":
        return 0
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {t.name: t for t in model.graph.initializer}  # and the exporter's Constant nodes:
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    done, replaced = 0, set()
    for node in model.graph.node:
        where = _WEIGHT_INPUTS.get(node.op_type) if node.domain == "com.microsoft" else None
        names = [node.input[i] for i in where] if where and len(node.input) > max(where) else []
        if not names or not all(n in consts for n in names):
            continue
        b, scale, zero = (numpy_helper.to_array(consts[n]) for n in names)
        if b.dtype != np.int8:
            continue
        if mode == "reduce_range":
            b, scale = np.clip(np.round(b / 2.0), -64, 64).astype(np.int8), (scale * 2).astype(scale.dtype)
        else:  # u8u8: the same codes, shifted
            b, zero = ((a.astype(np.int16) + 128).astype(np.uint8) for a in (b, zero))
        for i, value in zip(where, (b, scale, zero)):
            name = f"{node.name or node.output[0]}_{mode}_{i}"
            model.graph.initializer.append(numpy_helper.from_array(value, name))
            replaced.add(node.input[i])
            node.input[i] = name
        done += 1
    _drop_unused(model, replaced)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return done


def _drop_unused(model, names: set[str]) -> None:
    """Remove the initializers and Constant nodes among ``names`` that nothing reads (ORT warns of each)."""
    used = {n for node in model.graph.node for n in node.input}
    unused = names - used - {o.name for o in model.graph.output}
    nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in unused)]
    inits = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)


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

    def __init__(self, path: str | os.PathLike, threads: int = 2, source_counts: dict | None = None):
        super().__init__()
        self.path, self.threads = Path(path), threads
        if not self.path.is_file():
            raise ModelError(f"ONNX model not found: {self.path}")
        self.session = ort_session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # The weights live in the session, not in torch tensors: the metrics read these counts instead.
        if source_counts is not None:
            self.source_counts = dict(source_counts)

    def __deepcopy__(self, memo) -> OrtModule:
        """A second session on the same file (a session itself cannot be copied)."""
        return OrtModule(self.path, self.threads, getattr(self, "source_counts", None))

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
    opset: int = 17,
) -> OrtModule:
    """Export ``model`` (float or slimkit-quantized) and load it in an ONNX Runtime session."""
    from slimkit.export.qdq import quantize_outputs
    from slimkit.metrics.model import count_nonzero, count_parameters

    export_onnx(model, example_inputs, path, output_fn, opset=opset)
    share_input_quantization(path)
    quantize_outputs(path)  # static int8 layers: whole QDQ units for ONNX Runtime's int8 kernels
    choice = dispatch.ort_int8()
    if adapt_int8_weights(path, choice.kernel):
        logging.getLogger("slimkit.export").info("export: int8 weights for %s", choice.line())
    counts = {"params": count_parameters(model), "nonzero": count_nonzero(model)}
    return OrtModule(path, threads, counts)


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the layers that have no ONNX Runtime form (before any work).

    A layer says so itself: a module with an ``onnx_problem()`` method returns why it
    cannot be exported (or None), so this package needs to know no technique's layers.
    """
    refuse_layers(
        model, onnx_problem, "ONNX Runtime", "export supports float layers, int8_dynamic with "
        "activation_granularity: tensor, int8_static, weight-only, AWQ and int8 embeddings",
    )  # fmt: skip


def refuse_layers(model: nn.Module, problem: Callable[[nn.Module], str | None], target: str, supported: str):
    """Raise :class:`ModelError` naming (up to five of) the layers for which ``problem`` gives a reason."""
    found = [f"{name} ({why})" for name, m in model.named_modules() if (why := problem(m))]
    if found:
        more = " ..." if len(found) > 5 else ""
        raise ModelError(f"no {target} form for: " + ", ".join(found[:5]) + more + f"; {supported}")


def onnx_problem(module: nn.Module) -> str | None:
    """Why ``module`` has no ONNX Runtime form, or None (float layers and layers that export themselves)."""
    ask = getattr(module, "onnx_problem", None)
    return ask() if callable(ask) else None


def with_padding(example: Mapping[str, torch.Tensor], pad: int = 1) -> dict[str, torch.Tensor]:
    """``example`` with the last ``pad`` positions of its first row masked out (if none are), for export.

    The TorchScript exporter records one path through the model: traced with an
    all-ones mask, transformers skips masking altogether and the exported graph
    would ignore padding forever after.
    """
    out = {k: v.clone() for k, v in example.items()}
    mask = out.get("attention_mask")
    if mask is not None and bool(mask.all()):
        mask[0, -pad:] = 0
    return out
