"""``slimkit export RUN_DIR``: a finished run's final model written for ONNX Runtime (or torch.export),
checked there against the PyTorch model on the export step's example; bad input exits 2, writing nothing.

Two tiny runs on digits, made once: a float CNN (``evaluate`` only: export needs no training) and an
MLP whose linear layers are dynamic int8 (per-tensor activations, ONNX Runtime's int8 MatMuls; no
``torch.export`` form); and a tiny causal LM quantized to int4 (MatMulNBits).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slimkit.batch import first_output
from slimkit.cli import main
from slimkit.recipes.export_run import run_context
from slimkit.recipes.steps.export import export_example

ort = pytest.importorskip("onnxruntime")

MEASURE = {"repeats": 1, "warmup": 0}


def _run(root: Path, name: str, model: dict, steps: list) -> Path:
    recipe = {"model": model, "data": {"name": "digits"}, "steps": steps, "measure": MEASURE}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": str(root / name)}))
    assert main(["run", str(path), "-q"]) == 0
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    int8 = {"int8_dynamic": {"activation_granularity": "tensor"}}
    return {
        "cnn": _run(root, "cnn", {"builtin": "digits_cnn", "kwargs": {"width": 8}}, [{"type": "evaluate"}]),
        "int8": _run(
            root,
            "int8",
            {"builtin": "lenet300100", "kwargs": {"in_features": 64}},
            [{"type": "quantize", **int8}],
        ),
    }


def _export(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _reference(run: Path, samples: int = 8) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    ctx = run_context(run)
    return ctx.model, export_example(ctx, samples)


def _ort_output(path: Path, example: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in example.items()})[0]


def _printed(out: str, what: str) -> float:
    return float(re.search(rf"{what} ([0-9.e+-]+)", out).group(1))


def test_int8_run_exports_to_onnx_and_runs_in_onnxruntime_like_pytorch(runs, capsys):
    run = runs["int8"]
    code, out, err = _export(capsys, str(run), "--repeats", "2")
    assert code == 0, err
    path = run / "export" / "model.onnx"
    assert f"exported: {path} ({path.stat().st_size:,} bytes, onnx)" in out
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporary file left
    model, example = _reference(run)
    with torch.no_grad():
        ref = first_output(model(**example)).numpy()
    got = _ort_output(path, example)
    assert got.shape == ref.shape == (8, 10)
    assert np.abs(got - ref).max() < 1e-3  # the same int8 codes and scales (measured: 6e-08)
    assert abs(_printed(out, "max abs difference") - np.abs(got - ref).max()) < 1e-6
    assert _printed(out, "relative L2 error") <= 0.1 and "(tolerance 0.1): ok" in out
    assert "latency (median, batch of 8): ONNX Runtime " in out and " ms, PyTorch " in out
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulIntegerToFloat" in ops  # int8 kernels, not float
    # Batch is a dynamic axis: three other samples run as well.
    _, other = _reference(run, samples=3)
    with torch.no_grad():
        assert np.abs(_ort_output(path, other) - first_output(model(**other)).numpy()).max() < 1e-3


def test_float_cnn_exports_to_onnx_and_pt2_files_of_our_choosing(runs, tmp_path, capsys):
    run = runs["cnn"]
    model, example = _reference(run)
    with torch.no_grad():
        ref = first_output(model(**example)).numpy()
    code, out, err = _export(
        capsys, str(run), "--out", str(tmp_path / "cnn.onnx"), "--opset", "18", "--repeats", "0"
    )
    assert code == 0, err
    assert np.abs(_ort_output(tmp_path / "cnn.onnx", example) - ref).max() < 1e-4
    assert "latency" not in out and not (run / "export").exists()
    code, out, err = _export(capsys, str(run), "--to", "pt2", "--repeats", "0")
    assert code == 0, err
    path = run / "export" / "model.pt2"
    assert f"exported: {path} (" in out and _printed(out, "max abs difference") <= 1e-5
    program = torch.export.load(str(path)).module()
    assert np.abs(program(*example.values()).detach().numpy() - ref).max() < 1e-5


def _files(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such folder"),
        (["{empty}"], "not a finished slimkit run (no recipe.resolved.yaml)"),
        (["{int8}", "--to", "tflite"], "--to: unknown target 'tflite' (choose one of: onnx, pt2)"),
        # Layers with no torch.export form are named before anything is written.
        (["{int8}", "--to", "pt2"], "no torch.export form for: net.1 (int8 activations"),
        # ONNX Runtime's int8 output is close to, not equal to, PyTorch's: tolerance 0 refuses it.
        (["{int8}", "--tolerance", "0"], "(relative L2; max abs "),
        (["{int8}", "--tolerance", "2"], "--tolerance: must be in [0.0, 1.0]"),
        (["{int8}", "--out", "{tmp}/kept.onnx"], "exists; slimkit export does not replace it"),
        (["{int8}", "--step", "nope"], "--step: {int8} has no step 'nope' (steps: quantize)"),
    ],
)
def test_bad_input_exits_2_naming_it_and_writes_nothing(runs, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "kept.onnx").write_bytes(b"mine")
    places = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "int8": runs["int8"],
        "tmp": tmp_path,
    }
    before = _files(runs["int8"], tmp_path)  # an earlier export's file, if any, is left as it was
    code, out, err = _export(capsys, *(a.format(**places) for a in args))
    assert code == 2, err
    assert message.format(**places) in err and "Traceback" not in err and out == ""
    assert err.startswith("slimkit: ") and err.count("\n") == 1
    assert _files(runs["int8"], tmp_path) == before  # no partial file, no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept.onnx"]


def test_int4_causal_lm_exports_with_matmulnbits(tmp_path, capsys):
    from tests.llm_helpers import save_tiny_lm, text_lines

    text = tmp_path / "corpus.txt"
    text.write_text(text_lines(200))
    generation = {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1], "repeats": 1, "warmup": 0}
    recipe = {
        "model": {"hf": str(save_tiny_lm(tmp_path / "tiny", "llama")), "hf_task": "causal_lm"},
        "data": {"name": "text", "path": str(text), "seq_len": 32},
        "steps": [{"type": "quantize", "weight_only": {"bits": 4, "group_size": 32}}],
        "measure": {**MEASURE, "generation": generation},
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml"), "-q"]) == 0
    code, out, err = _export(capsys, str(tmp_path / "run"), "--repeats", "0")
    assert code == 0, err
    path = tmp_path / "run" / "export" / "model.onnx"
    model, example = _reference(tmp_path / "run")
    assert list(example) == ["input_ids"] and example["input_ids"].shape == (8, 32)  # 8 windows of seq_len
    with torch.no_grad():
        ref = first_output(model(**example)).numpy()
    got = _ort_output(path, example)
    assert got.shape == ref.shape and np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05  # measured 0.008
    import onnx

    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(path)).graph.node}
