"""Kernels chosen by the processor (issue 17 part 2): the table in slimkit.utils.dispatch, faked CPUs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from slimkit.cli import main
from slimkit.errors import ConfigError
from slimkit.quant import BF16Config, Int8DynamicConfig, Int8StaticConfig, quantize_
from slimkit.utils import cpu, dispatch
from slimkit.utils.sysinfo import machine_line

AVX2 = ["avx2"]
VNNI = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]


@pytest.fixture
def fake_cpu(monkeypatch):
    """``fake_cpu(flags, mkldnn=True)``: the dispatch sees these flags; oneDNN on or off."""
    for name in (dispatch.INT8_ENV, dispatch.BF16_ENV, dispatch.INT4_COMPUTE_ENV, dispatch.ORT_ENV):
        monkeypatch.delenv(name, raising=False)

    def fake(flags, mkldnn=True, torch_capability=None):
        info = {
            "torch": torch_capability or ("AVX512" if "avx512f" in flags else "AVX2"),
            "flags": flags,
            "cores": 2,
            "model": "fake",
        }
        monkeypatch.setattr(cpu, "capability", lambda: info)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", mkldnn)

    yield fake
    torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize(
    "flags, mkldnn, kernel, reduce_range",
    [
        (VNNI, True, "onednn", False),
        (VNNI + ["amx_int8"], True, "onednn", False),
        (VNNI, False, "fbgemm", False),  # oneDNN off: _int_mm's reference kernel; fbgemm has VNNI itself
        (AVX2, True, "fbgemm", True),  # u8 x s8 pairs saturate in int16 without VNNI: 7-bit activations
        (["avx2", "avx_vnni"], True, "fbgemm", True),  # PyTorch's _int_mm wants AVX-512 VNNI
    ],
)
def test_int8_gemm_follows_the_cpu(fake_cpu, flags, mkldnn, kernel, reduce_range):
    fake_cpu(flags, mkldnn)
    choice = dispatch.int8_gemm()
    assert (choice.kernel, choice.reduce_range) == (kernel, reduce_range)
    assert choice.why and choice.path in choice.line()
    # activations per tensor at run time: fbgemm everywhere it exists (it quantizes while packing)
    per_tensor = dispatch.int8_gemm(per_tensor_dynamic=True)
    assert (per_tensor.kernel, per_tensor.reduce_range) == ("fbgemm", reduce_range)
    assert per_tensor.path == "int8 dynamic per-tensor Linear"


def test_per_tensor_layers_say_their_own_kernel(fake_cpu, monkeypatch):
    fake_cpu(VNNI)
    model, x = _mlp()
    tensor, token = copy.deepcopy(model), copy.deepcopy(model)
    kernels = {
        "tensor": quantize_(tensor, Int8DynamicConfig(activation_granularity="tensor")).kernels,
        "token": quantize_(token, Int8DynamicConfig()).kernels,
    }
    assert kernels["tensor"]["int8 dynamic per-tensor Linear"].startswith("fbgemm (AVX-512 VNNI")
    assert kernels["token"]["int8 dynamic/static Linear"].startswith("onednn (AVX-512 VNNI")
    monkeypatch.setattr(dispatch, "_has_fbgemm", lambda: False)  # no fbgemm: oneDNN for both
    assert tensor[0].kernel().kernel == "onednn"
    with torch.no_grad():
        want = token(x)  # both run oneDNN; tensor and token scales differ, so only closeness is checked
        assert ((tensor(x) - want).norm() / want.norm()).item() < 0.05


def test_int8_gemm_without_fbgemm_is_fp32_and_env_overrides(fake_cpu, monkeypatch):
    fake_cpu(AVX2)
    monkeypatch.setattr(dispatch, "_has_fbgemm", lambda: False)
    assert dispatch.int8_gemm().kernel == "fp32"
    monkeypatch.setenv(dispatch.INT8_ENV, "onednn")
    forced = dispatch.int8_gemm()
    # forced onto the slow kernel: it says so
    assert forced.kernel == "onednn" and "0.05x" in forced.why and forced.slower
    monkeypatch.setenv(dispatch.INT8_ENV, "cublas")
    with pytest.raises(ConfigError, match=dispatch.INT8_ENV):
        dispatch.int8_gemm()


def test_bf16_int4_and_ort_follow_the_cpu(fake_cpu, monkeypatch):
    fake_cpu(AVX2)
    assert dispatch.bf16_compute().kernel == "fp32"
    # ATen's int4/int8 weight-only kernels: bf16 is their vector path on AVX2 too (float32 10-60x slower)
    assert dispatch.int4_compute().kernel.endswith("bf16") and dispatch.int4_compute().slower
    assert dispatch.int8_weight_only().kernel.endswith("bf16") and "AVX2" in dispatch.int8_weight_only().why
    assert dispatch.ort_int8().kernel == "u8u8"  # the same codes as on VNNI, on a kernel that cannot saturate
    assert dispatch.int8_conv().kernel == "fp32"
    fake_cpu(VNNI)
    assert dispatch.bf16_compute().kernel == "bf16"
    assert dispatch.int4_compute().kernel.endswith("bf16") and not dispatch.int4_compute().slower
    assert dispatch.ort_int8().kernel == "u8s8"
    fake_cpu([], torch_capability="DEFAULT")  # no vector code in ATen: both compute types slow
    assert dispatch.int4_compute().kernel.endswith("fp32") and dispatch.int4_compute().slower
    fake_cpu(["avx2", "amx_bf16"])
    assert dispatch.bf16_compute().kernel == "bf16"
    monkeypatch.setenv(dispatch.ORT_ENV, "reduce_range")
    monkeypatch.setenv(dispatch.BF16_ENV, "fp32")
    assert dispatch.ort_int8().reduce_range and dispatch.bf16_compute().kernel == "fp32"


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval(), torch.randn(200, 64)


CONFIGS = [Int8DynamicConfig(), Int8DynamicConfig(activation_granularity="tensor"), Int8StaticConfig()]


def _with_onednn_reference(fake_cpu, monkeypatch, config):
    """(float model, its quantized copy, input, float output, oneDNN path's output).

    The reference is forced onto ``torch._int_mm``: an exact int32 GEMM on any CPU (oneDNN's VNNI
    kernel, or its reference loop on an AVX2 one); the CPU's own choice is back afterwards."""
    model, x = _mlp()
    q = copy.deepcopy(model)
    quantize_(q, config, calibration_data=[x[:100], x[100:]])
    fake_cpu(VNNI)
    monkeypatch.setenv(dispatch.INT8_ENV, "onednn")
    with torch.no_grad():
        fp, ref = model(x), q(x)
    monkeypatch.delenv(dispatch.INT8_ENV)
    return model, q, x, fp, ref


@pytest.mark.parametrize("config", CONFIGS, ids=["token", "tensor", "static"])
def test_quant_linear_fallbacks_match_the_int8_reference(fake_cpu, monkeypatch, config):
    model, q, x, fp, ref = _with_onednn_reference(fake_cpu, monkeypatch, config)
    with torch.no_grad():
        int8_err = ((ref - fp).norm() / fp.norm()).item()

        def never(*args):
            raise AssertionError("torch._int_mm called on the fallback path")

        monkeypatch.setattr(torch, "_int_mm", never)
        fake_cpu(VNNI, mkldnn=False)  # fbgemm with VNNI: the same 8-bit codes
        same = q(x)
        fake_cpu(AVX2, mkldnn=False)  # fbgemm with 7-bit activations
        seven = q(x)
        monkeypatch.setenv(dispatch.INT8_ENV, "fp32")
        plain = q(x)
    # one code may differ at a rounding tie (fbgemm adds the zero point before rounding)
    assert (same - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    assert torch.allclose(same, ref, atol=1e-4) or config.activation_granularity == "token"
    assert ((seven - fp).norm() / fp.norm()).item() < 3 * int8_err  # 7 bits: about twice int8's error
    assert ((plain - fp).norm() / fp.norm()).item() < int8_err  # weights only quantized


def test_conv_and_bf16_fall_back_to_float32(fake_cpu):
    torch.manual_seed(0)
    conv, x = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval(), torch.randn(2, 3, 10, 10)
    lin, t = nn.Sequential(nn.Linear(16, 8)).eval(), torch.randn(4, 16)
    qc, qb = copy.deepcopy(conv), copy.deepcopy(lin)
    quantize_(qc, Int8DynamicConfig(activation_granularity="tensor"))
    quantize_(qb, BF16Config())
    fake_cpu(AVX2)
    with torch.no_grad():
        want = nn.functional.conv2d(x, qc[0].weight(), qc[0].bias(), padding=1)
        assert torch.allclose(qc(x), want, atol=1e-5)
        bf16_weights = qb[0].weight.float()
        assert torch.allclose(qb(t), nn.functional.linear(t, bf16_weights, qb[0].bias.float()), atol=1e-5)


def test_quantize_summary_and_log_say_which_kernel(fake_cpu, caplog):
    model, x = _mlp()
    fake_cpu(AVX2)
    with caplog.at_level("INFO", logger="slimkit.quant"):
        summary = quantize_(model, Int8DynamicConfig())
    choice = summary.kernels["int8 dynamic/static Linear"]
    assert choice.startswith("fbgemm (no AVX-512 VNNI") and "7 bits" in choice
    assert "kernel: int8 dynamic/static Linear: fbgemm" in caplog.text


def test_slimkit_info_prints_every_path(fake_cpu, capsys):
    fake_cpu(AVX2)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for line in ("int8 dynamic/static Linear: fbgemm", "int8 weight-only: _weight_int8pack_mm",
                 "int4 weight-only: _weight_int4pack_mm in bf16", "bf16: fp32", "ONNX Runtime int8: u8u8"):  # fmt: skip
        assert line in out
    assert "versions: slimkit" in out and "torch cpu capability: AVX2" in out


def test_slimkit_info_loads_no_heavy_dependency():
    code = (
        "import sys; from slimkit.cli import main; assert main(['info', '--json']) == 0; "
        "heavy = [m for m in ('transformers', 'onnx', 'onnxruntime', 'sklearn', 'scipy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"kernels"' in done.stdout


def test_machine_line_has_capability_and_load():
    line = machine_line()
    assert torch.backends.cpu.get_cpu_capability() in line and "load average" in line


@pytest.mark.parametrize("mode", ["reduce_range", "u8u8"])
def test_ort_int8_weights_adapted_for_cpus_without_vnni(tmp_path, mode):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from slimkit.export.onnx import OrtModule, adapt_int8_weights, export_onnx, share_input_quantization

    float_model, x = _mlp()
    model = copy.deepcopy(float_model)
    quantize_(model, Int8DynamicConfig(activation_granularity="tensor"))
    base, path = tmp_path / "u8s8.onnx", tmp_path / f"{mode}.onnx"
    for p in (base, path):
        export_onnx(model, {"input": x}, p)
        share_input_quantization(p)
    assert adapt_int8_weights(path, mode) == 2  # both int8 MatMuls
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    codes = [w for w in weights if w.dtype.itemsize == 1 and w.ndim == 2]
    ref, out = OrtModule(base)(input=x), OrtModule(path)(input=x)
    with torch.no_grad():
        fp = float_model(x)
    if mode == "u8u8":  # the same codes, unsigned: the same result
        assert all(w.dtype.kind == "u" for w in codes)
        assert torch.allclose(out, ref, atol=1e-5)
    else:  # 7-bit codes: |q| <= 64, so no u8 x s8 pair reaches int16's limit
        assert all(int(abs(w.astype(int)).max()) <= 64 for w in codes)
        assert ((out - fp).norm() / fp.norm()).item() < 3 * ((ref - fp).norm() / fp.norm()).item()


@pytest.mark.parametrize(
    "forced, flags, capped",
    [
        (None, VNNI, None),
        ("avx2", ["avx2"], "ATEN_CPU_CAPABILITY=avx2"),
        ("AVX2 ", ["avx2"], "ATEN_CPU_CAPABILITY=avx2"),
        ("default", [], "ATEN_CPU_CAPABILITY=default"),
        ("avx512", VNNI, None),  # not below what the CPU has: nothing capped
    ],
)
def test_aten_capability_cap_is_followed(monkeypatch, forced, flags, capped):
    """Told to run PyTorch's AVX2 code, slimkit chooses kernels as on an AVX2-only CPU."""
    if forced is None:
        monkeypatch.delenv(cpu.ATEN_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu.ATEN_ENV, forced)
    assert cpu.capped(VNNI) == (flags, capped)


def test_emulated_avx2_shows_in_info_and_machine_line(monkeypatch):
    """``slimkit info`` under the AVX2 caps: the kernels an AVX2-only CPU gets, and the missing caps named."""
    from slimkit.utils import sysinfo

    hardware = {"torch": "AVX2", "flags": ["avx2"], "hardware_flags": VNNI, "cores": 2, "model": "fake"}
    monkeypatch.setattr(cpu, "capability", lambda: {**hardware, "capped_by": "ATEN_CPU_CAPABILITY=avx2"})
    for name in cpu.EMULATE_AVX2:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cpu.ATEN_ENV, "avx2")
    text = sysinfo.info_text()
    assert "int8 dynamic/static Linear: fbgemm" in text and "ONNX Runtime has no such cap" in text
    assert (
        "also set MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2"
        in text
    )
    for name, value in cpu.EMULATE_AVX2.items():
        monkeypatch.setenv(name, value)
    text = sysinfo.info_text()
    assert "also set" not in text and "the CPU itself has avx2 avx512f avx512_vnni" in text
    assert "(capped by ATEN_CPU_CAPABILITY=avx2; the CPU has avx2 avx512f" in sysinfo.machine_line()
    assert sysinfo.info()["library_caps"] == cpu.EMULATE_AVX2


def test_fbgemm_avx2_code_saturates_without_reduce_range():
    """Why 7-bit activations on AVX2: fbgemm's AVX2 code (forced in a subprocess) saturates u8 x s8 pairs."""
    code = (
        "import torch; from slimkit.quant import kernels; "
        "packed = kernels.fbgemm_pack(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8) / 127, None); "
        "x = torch.ones(2, 64); op = torch.ops.quantized.linear_dynamic; "
        "print(op(x, packed, False)[0, 0].item(), op(x, packed, True)[0, 0].item())"
    )
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    full, seven = (float(v) for v in done.stdout.split())
    assert abs(seven - 64.0) < 0.5  # 7-bit codes: exact sum of 64 ones
    assert full < 40.0  # 255 x 127 x 2 = 64770 clipped to 32767 in every pair: about half the sum


@pytest.mark.parametrize("config", CONFIGS, ids=["token", "tensor", "static"])
def test_exact_int8_is_the_codes_result_on_any_cpu(fake_cpu, monkeypatch, config):
    """``exact_int8`` gives the oneDNN path's result bit for bit, also where the CPU's kernel is fbgemm 7-bit."""
    _, q, x, _, ref = _with_onednn_reference(fake_cpu, monkeypatch, config)
    with torch.no_grad():
        fake_cpu(AVX2)
        seven = q(x)
        with dispatch.exact_int8():
            assert dispatch.int8_gemm().kernel == "exact" and dispatch.int8_conv().kernel == "exact"
            exact = q(x)
        assert dispatch.int8_gemm().kernel == "fbgemm"  # the block ends, the CPU's choice is back
    assert torch.equal(exact, ref)
    assert not torch.equal(seven, ref)


def test_export_check_uses_the_exact_codes(fake_cpu, tmp_path):
    """On a CPU without VNNI the PyTorch model runs 7-bit activations; the export is checked against its codes."""
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import to_onnxruntime
    from slimkit.recipes.steps.export import runtime_error

    model, x = _mlp()
    quantize_(model, Int8DynamicConfig(activation_granularity="tensor"))
    fake_cpu(AVX2)
    ort = to_onnxruntime(model, {"input": x}, tmp_path / "m.onnx")
    with torch.no_grad():
        seven_error = ((ort(input=x) - model(x)).norm() / model(x).norm()).item()
    assert runtime_error(model, ort, {"input": x})[1] < min(1e-3, seven_error / 3)
