"""The conformance table's export columns: every row's model, exported, runs in the target runtime.

For each row of tests/conformance_rows.py and each tiny model it applies to, the model the verb
left is exported to ONNX (:func:`slimkit.export.to_onnxruntime`) and run in ONNX Runtime on the
row's inputs; the output must match the PyTorch model's within ``ONNX`` (relative L2 error), or,
where the row says ``REFUSED``, ``check_exportable`` must refuse it before anything is written,
naming the layer. A row without an entry fails: a new method states how it exports.

``torch.export`` (an ExecuTorch-ready ``.pt2``) is the second target, checked on float and
pruned/distilled models (``PT2``); quantized layers run slimkit's own kernels, which it does not
trace (see slimkit/export/pt2.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from slimkit.errors import ModelError
from slimkit.export import check_exportable, to_onnxruntime, with_padding
from slimkit.export.onnx import onnx_problem
from tests.conformance_rows import ROWS
from tests.test_conformance import CASES, applied, output, relative_error

REFUSED = "refused"

# Row id -> the largest relative L2 error of ONNX Runtime's output against the PyTorch model, or
# REFUSED (its layers have no ONNX Runtime form and say so through onnx_problem()).
# Float rows: float rounding and fused kernels. int8 rows: ONNX Runtime rounds activations on its
# own (its requantization, uint8 codes); weight-only rows: MatMulNBits in float math (PyTorch's
# kernel computes in bf16 where the CPU has it).
ONNX = {
    "prune/magnitude": 1e-4,
    "prune/gradual": 1e-4,
    "prune/structured": 1e-4,
    "prune/wanda": 1e-4,
    "prune/sparsegpt": 1e-4,
    "prune/depth": 1e-4,
    "quant/int8_dynamic": REFUSED,  # activations per token; per tensor exports (DynamicQuantizeMatMul)
    "quant/int8_dynamic[smoothquant_auto]": REFUSED,
    "quant/int8_static": 0.05,
    "quant/weight_only": 0.02,
    "quant/awq": 0.02,
    "quant/qat": 0.05,
    "quant/codebook": 1e-4,
    "quant/codebook[int8_activations]": REFUSED,  # int8 codebook + int8 activations: no ONNX form yet
    "quant/bf16": REFUSED,
    "quant/mixed": REFUSED,  # its int8_dynamic part is per token
    "distill/distill_": 1e-4,
    "activations/relu": 1e-4,
    "activations/hardswish": 1e-4,
    "activations/hardsigmoid": 1e-4,
    "activations/pwl": 1e-4,
}


def _export_inputs(model: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
    if isinstance(inputs, dict):
        return with_padding(inputs)
    name = next(iter(inspect.signature(model.forward).parameters))  # export passes keywords
    return {name: inputs}


def _onnx_cases():
    return [(r, m) for r, m in CASES if r.family != "transfer"]


def test_every_row_states_its_onnx_export():
    missing = sorted({r.id for r, _ in _onnx_cases()} - ONNX.keys())
    assert not missing, f"rows without an ONNX export entry in ONNX: {missing}"


@pytest.mark.parametrize(("row", "model_name"), _onnx_cases(), ids=[f"{r.id}-{m}" for r, m in _onnx_cases()])
def test_export_runs_in_onnxruntime_within_tolerance(row, model_name: str, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    got = applied(row, model_name)
    expected = ONNX[row.id]
    path = tmp_path / "model.onnx"
    if expected == REFUSED:
        bad = [name for name, m in got.model.named_modules() if onnx_problem(m)]
        assert bad, f"{row.id} is declared REFUSED but every layer has an ONNX form: update ONNX"
        with pytest.raises(ModelError, match="no ONNX Runtime form") as err:
            to_onnxruntime(got.model, _export_inputs(got.model, got.inputs), path)
        assert bad[0] in str(err.value) and not path.exists()
        return
    check_exportable(got.model)
    feeds = _export_inputs(got.model, got.inputs)
    ort = to_onnxruntime(got.model, feeds, path)
    ref = output(got.model, feeds)
    err = relative_error(ort(**feeds).float(), ref)
    assert err <= expected, f"{row.id} on {model_name}: ONNX Runtime vs PyTorch relative error {err:.2e}"


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize(
    ("row_id", "model_name", "op"),
    [("quant/weight_only", "llama", "MatMulNBits"), ("quant/awq", "mlp", "MatMulNBits"),
     ("quant/int8_static", "cnn", "QuantizeLinear")],
)  # fmt: skip
def test_quantized_layers_export_as_runtime_kernels(row_id: str, model_name: str, op: str, tmp_path: Path):
    """Weight-only layers keep their packed codes (MatMulNBits), static int8 ones become QDQ units."""
    pytest.importorskip("onnxruntime")
    row = next(r for r in ROWS if r.id == row_id)
    got = applied(row, model_name)
    path = tmp_path / "m.onnx"
    to_onnxruntime(got.model, _export_inputs(got.model, got.inputs), path)
    assert op in _ops(path)
    assert "MatMul" not in _ops(path) or op != "MatMulNBits" or model_name == "llama"  # attention MatMuls


# Row id -> torch.export's largest relative L2 error against the PyTorch model, or REFUSED
# (layers answering pt2_problem(): int8 activations on fbgemm / torch._int_mm). Checked on the MLP
# and the CNN, and on the tiny Llama for a few rows (torch.export of a decoder takes seconds).
PT2 = {
    **{r: 1e-5 for r in ONNX if r.startswith(("prune/", "distill/", "activations/"))},
    "quant/int8_dynamic": REFUSED,
    "quant/int8_dynamic[smoothquant_auto]": REFUSED,
    "quant/int8_static": REFUSED,
    "quant/weight_only": 1e-5,
    "quant/awq": 1e-5,
    "quant/qat": REFUSED,
    "quant/codebook": 1e-5,
    "quant/codebook[int8_activations]": REFUSED,  # slimkit's int8 kernels, like int8_dynamic
    "quant/bf16": 0.01,  # the traced path may take the other bf16 branch (native vs fp32 math)
    "quant/mixed": REFUSED,
}
_PT2_LLAMA = ("prune/structured", "quant/weight_only", "distill/distill_")  # the decoder, a few rows
_PT2_CASES = [
    (r, m) for r, m in _onnx_cases() if m in ("mlp", "cnn") or (m == "llama" and r.id in _PT2_LLAMA)
]


def test_every_row_states_its_torch_export():
    missing = sorted({r.id for r, _ in _onnx_cases()} - PT2.keys())
    assert not missing, f"rows without a torch.export entry in PT2: {missing}"


@pytest.mark.parametrize(("row", "model_name"), _PT2_CASES, ids=[f"{r.id}-{m}" for r, m in _PT2_CASES])
def test_torch_export_round_trips(row, model_name: str, tmp_path: Path):
    from slimkit.export.pt2 import export_pt2, load_pt2, pt2_problem

    got = applied(row, model_name)
    feeds = _export_inputs(got.model, got.inputs)
    path = tmp_path / "model.pt2"
    if PT2[row.id] == REFUSED:
        bad = [name for name, m in got.model.named_modules() if pt2_problem(m)]
        assert bad, f"{row.id} is declared REFUSED but every layer has a torch.export form: update PT2"
        with pytest.raises(ModelError, match="no torch.export form") as err:
            export_pt2(got.model, feeds, path)
        assert bad[0] in str(err.value) and not path.exists()
        return
    export_pt2(got.model, feeds, path)
    with torch.no_grad():
        out = load_pt2(path)(*feeds.values()).float()
    err = relative_error(out, output(got.model, feeds))
    assert err <= PT2[row.id], f"{row.id} on {model_name}: torch.export vs PyTorch relative error {err:.2e}"
