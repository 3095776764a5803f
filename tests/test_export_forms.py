"""The ONNX forms of quantized layers: MatMulNBits' packed layout, QDQ units fused by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit import quant
from slimkit.export import to_onnxruntime
from slimkit.export.nbits import block_size_for, nbits_weight
from slimkit.models import DigitsCNN

pytest.importorskip("onnxruntime")


def _nodes(path: Path, op: str) -> list:
    import onnx

    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def _exact_error(model: nn.Sequential, x: torch.Tensor, out: torch.Tensor) -> float:
    """Relative error of ``out`` against float64 math on the layer's own dequantized weights."""
    layer = model[0]
    w = layer.weight().double()
    ref = x.double() @ w.t() + layer.bias_value.double()
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize(
    ("config", "bits", "block"),
    [(quant.WeightOnlyConfig(bits=4, group_size=32, symmetric=False), 4, 32),
     (quant.WeightOnlyConfig(bits=4, group_size=64), 4, 64),
     (quant.WeightOnlyConfig(bits=8), 8, 64),
     (quant.AWQConfig(group_size=32), 4, 32)],
)  # fmt: skip
def test_weight_only_exports_as_matmulnbits_with_the_same_weights(
    config, bits, block, tmp_path: Path, monkeypatch
):
    import slimkit.export.nbits as nbits

    monkeypatch.setattr(nbits, "DEFAULT_ACCURACY_LEVEL", 0)  # float math: only float32 rounding left
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(192, 48)).eval()
    x = torch.randn(6, 192)
    quant.quantize_(model, config, calibration_data=[x])
    ort = to_onnxruntime(model, {"input": x}, tmp_path / "m.onnx")
    (node,) = _nodes(tmp_path / "m.onnx", "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (bits, block, 192, 48)
    assert attrs["accuracy_level"] == 0
    # Float math on the very codes: only float32 rounding between ONNX Runtime and float64.
    assert _exact_error(model, x, ort(input=x)) < 1e-5
    assert bool(_nodes(tmp_path / "m.onnx", "Div")) == isinstance(config, quant.AWQConfig)  # AWQ's scales
    monkeypatch.setattr(nbits, "DEFAULT_ACCURACY_LEVEL", 4)  # the default: int8 activations per block
    fast = to_onnxruntime(model, {"input": x}, tmp_path / "fast.onnx")
    (node,) = _nodes(tmp_path / "fast.onnx", "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    assert 1e-5 < _exact_error(model, x, fast(input=x)) < 0.02


def test_matmulnbits_codes_and_zero_points_are_shifted_and_packed():
    codes = torch.tensor([[-8, 7] * 16 + [0, 1] * 16])  # one row, two blocks of 32
    scale = torch.tensor([[0.5, 2.0]])
    zero = torch.tensor([[-1, 3]], dtype=torch.int8)
    w = nbits_weight(codes, scale, zero, 4, 32)
    assert w.packed.shape == (1, 2, 16)
    assert w.packed[0, 0, 0] == (0 | (15 << 4)) and w.packed[0, 1, 0] == (8 | (9 << 4))
    assert list(w.zeros) == [7 | (11 << 4)] and list(w.scales) == [0.5, 2.0]
    torch.testing.assert_close(w.dense[0, :2], torch.tensor([-3.5, 4.0]))


def test_layers_without_a_block_size_export_as_a_float_matmul(tmp_path: Path):
    assert block_size_for(40, None) is None and block_size_for(128, None) == 128
    assert block_size_for(96, 48) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 8)).eval()
    x = torch.randn(3, 40)
    quant.quantize_(model, quant.WeightOnlyConfig(bits=8))
    ort = to_onnxruntime(model, {"input": x}, tmp_path / "m.onnx")
    assert not _nodes(tmp_path / "m.onnx", "MatMulNBits")
    assert _exact_error(model, x, ort(input=x)) < 1e-5


def test_static_int8_cnn_runs_on_onnxruntime_int8_kernels(tmp_path: Path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = DigitsCNN(width=8, dropout=0.0).eval()
    x = torch.randn(32, 1, 8, 8)
    quant.quantize_(model, quant.Int8StaticConfig(), calibration_data=[x])
    session = to_onnxruntime(model, {"x": x}, tmp_path / "m.onnx")
    with torch.no_grad():
        ref = model(x)
    assert float((session(x=x) - ref).norm() / ref.norm()) < 0.02
    # Each conv / linear output carries the next layer's quantizer (moved above ReLU and MaxPool).
    assert len(_nodes(tmp_path / "m.onnx", "QuantizeLinear")) == 4 + 3
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in __import__("onnx").load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("QLinearConv") == 2 and fused.count("QGemm") == 2
    assert "Conv" not in fused and "Gemm" not in fused


def test_export_step_runs_the_static_int8_cnn_on_onnxruntime(tmp_path: Path):
    """The demo's path: train, int8_static, export; the report row is measured in ONNX Runtime."""
    import json

    import yaml

    from slimkit.cli import main

    recipe = {
        "name": "int8-export",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [
            {"type": "train", "train": {"epochs": 2, "lr": 0.01, "progress": False}},
            {"type": "quantize", "int8_static": {}, "calibration_samples": 64},
            {"type": "export", "onnxruntime": {"example_samples": 8, "tolerance": 0.05}},
        ],
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 32},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet"]) == 0
    _, quantized, exported = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert exported["extra"]["onnx_vs_pytorch_error"] <= 0.05
    assert abs(exported["metrics"]["accuracy"] - quantized["metrics"]["accuracy"]) <= 0.01
    assert exported["size_bytes"] < quantized["size_bytes"] * 2  # int8 codes in the graph, not floats
