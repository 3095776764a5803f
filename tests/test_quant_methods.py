"""Quantization methods: the method table, GPTQ, QAT, mixed precision, transformers, ONNX Runtime."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimkit.calibration.collectors import HessianAccumulator
from slimkit.errors import ConfigError
from slimkit.models.builtin import LeNet5, LeNet300100
from slimkit.quant import (
    BF16Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    MixedPrecisionConfig,
    QATCallback,
    QATConfig,
    WeightOnlyConfig,
    config_from_dict,
    convert_,
    load_quantized,
    method_names,
    onnx_problem,
    prepare_,
    quantize_,
    save_quantized,
)
from slimkit.quant.affine import QSpec, dequantize, fake_quantize, quantize_tensor, sqnr_db
from slimkit.quant.base import QuantConfig
from slimkit.quant.codecs import LayerCodec
from slimkit.quant.gptq import gptq_quantize, layer_output_error
from slimkit.quant.method import QuantMethod, register_method, registered
from slimkit.quant.modules import QuantConv2d, QuantLinear
from slimkit.quant.qat import QATConv2d, QATLinear


# -- the method table: a new method is one file (here: these few lines) and its registration --------------
@dataclass
class HalfConfig(QuantConfig):
    """Weights rounded to float16, compute in float32: the smallest possible method."""


class HalfLinear(nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear) -> HalfLinear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=torch.float16)
        with torch.no_grad():
            mod.weight.copy_(linear.weight)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x, self.weight.float(), bias)


class HalfMethod(QuantMethod):
    name = "fp16_roundtrip"
    config_type = HalfConfig
    codecs = (LayerCodec(HalfLinear, lambda float_module, info: HalfLinear.from_float(float_module)),)

    def build(self, config, module, collectors):
        return HalfLinear.from_float(module)


def test_a_registered_method_quantizes_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model, x = LeNet300100().eval(), torch.rand(16, 1, 28, 28)
    ref = model(x)
    with registered(HalfMethod()):
        assert method_names()[-1] == "fp16_roundtrip"
        cfg = config_from_dict({"method": "fp16_roundtrip", "overrides": {"net.7": None}})
        assert isinstance(cfg, HalfConfig) and cfg.method == "fp16_roundtrip" and onnx_problem(cfg) is None
        summary = quantize_(model, cfg)
        assert summary.method == "fp16_roundtrip" and list(summary.quantized) == ["net.1", "net.4"]
        assert list(summary.skipped) == ["net.7"] and isinstance(model.net[4], HalfLinear)
        assert sqnr_db(ref, model(x)) > 50.0
        save_quantized(model, tmp_path / "half.safetensors")
        fresh = load_quantized(LeNet300100(), tmp_path / "half.safetensors").eval()
        assert isinstance(fresh.net[1], HalfLinear) and torch.equal(fresh(x), model(x))
        # Built-in configs hand layers to it too, by override or as mixed precision's ``low``.
        mixed = LeNet300100().eval()
        low_cfg = MixedPrecisionConfig(
            low={"method": "fp16_roundtrip"},
            overrides={"net.7": {"method": "int8_dynamic"}},
            max_high_layers=1,
        )
        result = quantize_(mixed, low_cfg, calibration_data=[x])
        (kept,) = result.analysis["high"]  # one layer kept float, the two others quantized as planned
        assert set(result.quantized) == {"net.1", "net.4", "net.7"} - {kept} and kept in result.skipped
        assert {type(mixed.get_submodule(n)).__name__ for n in result.quantized} <= {
            "HalfLinear",
            "QuantLinear",
        }
    assert "fp16_roundtrip" not in method_names()
    with pytest.raises(ConfigError, match="^method: must be one of int8_dynamic, int8_static"):
        config_from_dict({"method": "fp16_roundtrip"})


BUILT_IN = ["int8_dynamic", "int8_static", "weight_only", "qat", "bf16", "mixed", "awq", "codebook"]


def test_the_method_table_refuses_duplicates():
    assert method_names() == BUILT_IN
    with registered(HalfMethod()):
        with pytest.raises(ValueError, match="'fp16_roundtrip' is already registered"):
            register_method(HalfMethod())
        renamed = type("Renamed", (HalfMethod,), {"name": "fp16_again"})()
        with pytest.raises(ValueError, match="HalfConfig is already the config of method 'fp16_roundtrip'"):
            register_method(renamed)

    class BF16Linear(nn.Linear):  # another layer class under a name the file format already uses
        pass

    @dataclass
    class RivalConfig(QuantConfig):
        pass

    rival = type("Rival", (HalfMethod,), {"name": "rival", "config_type": RivalConfig})()
    rival.codecs = (LayerCodec(BF16Linear, lambda float_module, info: BF16Linear(1, 1)),)
    with pytest.raises(ValueError, match="another codec is registered for layer class BF16Linear"):
        register_method(rival)
    assert method_names() == BUILT_IN


_NO_FORM = "layers have no ONNX Runtime form; use int8_dynamic, int8_static or weight_only"


@pytest.mark.parametrize(
    ("config", "field", "why"),
    [
        (Int8DynamicConfig(), "activation_granularity", "must be tensor"),
        (Int8DynamicConfig(activation_granularity="tensor"), None, None),
        (WeightOnlyConfig(bits=4, algorithm="gptq"), None, None),
        (Int8StaticConfig(), None, None),  # QDQ units (slimkit.export.qdq)
        (QATConfig(), None, None),  # static int8 layers: QDQ
        (QATConfig(activation_bits=None), "activation_bits", "must be 8"),
        (BF16Config(), "method", f"bf16 {_NO_FORM}"),
        (MixedPrecisionConfig(max_error=0.1), "low.activation_granularity", "must be tensor"),
        (
            MixedPrecisionConfig(low=WeightOnlyConfig(), high=BF16Config(), max_error=0.1),
            "high.method",
            f"bf16 {_NO_FORM}",
        ),
        (
            WeightOnlyConfig(overrides={"fc*": None, "head": {"method": "bf16"}}),
            "overrides.head.method",
            f"bf16 {_NO_FORM}",
        ),
        (
            Int8DynamicConfig(
                activation_granularity="tensor",
                overrides={"fc*": {"activation_granularity": "tensor", "overrides": {"fc1": {}}}},
            ),
            "overrides.fc*.overrides.fc1.activation_granularity",
            "must be tensor",
        ),
    ],
)
def test_onnx_problem_names_the_field(config, field, why):
    found = onnx_problem(config)
    assert (found is None) is (field is None)
    if found is not None:
        assert found[0] == field and found[1].startswith(why)


def test_qat_quantize_only_prepares():
    model = LeNet300100()
    summary = quantize_(model, QATConfig(overrides={"net.7": None}))
    assert (
        summary.method == "qat"
        and not summary.quantized
        and summary.skipped == {"net.7": "override 'net.7': kept in float"}
    )
    assert list(summary.prepared) == ["net.1", "net.4"] and isinstance(model.net[1], QATLinear)
    assert list(convert_(model).quantized) == ["net.1", "net.4"]


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Features driven by k/4 latent factors plus noise, as real activations are (where GPTQ pays off)."""
    fixed = torch.Generator().manual_seed(1234)  # one correlation structure for every sample
    factors = torch.randn(k // 4, k, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k // 4, generator=g) @ factors + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize(
    "spec",
    [
        QSpec(4, True, "group", 0, 32),
        QSpec(4, False, "group", 0, 64),
        QSpec(8, True, "channel", 0),
        QSpec(4, True, "channel", 0),
    ],
    ids=["int4-g32-sym", "int4-g64-asym", "int8-channel", "int4-channel"],
)
def test_gptq_beats_round_to_nearest_on_layer_output(spec):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = _correlated_inputs(2048, 128)
    acc = HessianAccumulator(128)
    for chunk in x.split(512):
        acc.update(chunk)
    assert torch.allclose(acc.h, 2 * x.double().t() @ x.double() / len(x), rtol=1e-6)
    q_rtn, s_rtn, z_rtn = quantize_tensor(w, spec)
    q_g, s_g, z_g = gptq_quantize(w, acc.h, spec, damp=0.01, block_size=64)
    assert q_g.shape == q_rtn.shape and s_g.shape == s_rtn.shape and z_g.shape == z_rtn.shape
    assert int(q_g.min()) >= spec.qmin and int(q_g.max()) <= spec.qmax
    x_test = _correlated_inputs(512, 128, seed=1)  # held out
    err_rtn = layer_output_error(w, dequantize(q_rtn, s_rtn, z_rtn, spec), x_test)
    err_gptq = layer_output_error(w, dequantize(q_g, s_g, z_g, spec), x_test)
    assert err_gptq < 0.5 * err_rtn  # measured about 0.13 of the RTN error


def test_gptq_through_the_api_beats_rtn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    calib = [_correlated_inputs(256, 128, seed=i) for i in range(4)]
    test = _correlated_inputs(512, 128, seed=9)
    ref = model(test)
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(rtn, WeightOnlyConfig(bits=4, group_size=32))
    quantize_(gptq, WeightOnlyConfig(bits=4, group_size=32, algorithm="gptq"), calibration_data=calib)
    assert sqnr_db(ref, gptq(test)) > sqnr_db(ref, rtn(test)) + 0.5


def test_fake_quant_straight_through_gradient():
    spec = QSpec(4, True, "tensor")
    x = torch.tensor([-3.0, -0.26, 0.1, 0.49, 2.0], requires_grad=True)
    scale, zero = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    y = fake_quantize(x, scale, zero, spec)
    assert torch.allclose(y, torch.tensor([-0.7, -0.3, 0.1, 0.5, 0.7]))
    y.sum().backward()
    # Gradient 1 inside the representable range [-0.7, 0.7], 0 where values were clipped.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_qat_layers_train_with_gradients_and_convert(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # built BEFORE the swap: must stay valid
    prepare_(model, QATConfig(weight_bits=4))
    assert isinstance(model.features[0], QATConv2d) and isinstance(model.classifier[1], QATLinear)
    w0 = model.classifier[1].weight.detach().clone()
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert model.classifier[1].weight.grad.abs().sum() > 0
        assert model.features[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert not torch.equal(w0, model.classifier[1].weight) and losses[-1] < losses[0]
    model.eval()
    fake = model(x)
    convert_(model)
    assert isinstance(model.features[0], QuantConv2d) and model.features[0].weight_bits == 4
    assert int(model.classifier[1].qweight.abs().max()) <= 7
    assert sqnr_db(fake, model(x)) > 25.0  # the integer model computes what training simulated
    save_quantized(model, tmp_path / "lenet5.safetensors")  # 6 x 25 codes: an odd count per channel
    fresh = load_quantized(LeNet5(), tmp_path / "lenet5.safetensors").eval()
    assert torch.equal(fresh(x), model(x))


def test_qat_callback_in_the_trainer(tmp_path):
    from torch.utils.data import TensorDataset

    from slimkit.train.config import TrainConfig
    from slimkit.train.trainer import Trainer

    torch.manual_seed(0)
    x = torch.rand(128, 1, 28, 28)
    y = (x.mean(dim=(1, 2, 3)) > x.mean()).long()
    model = LeNet300100()
    callback = QATCallback({"weight_bits": 4}, convert_at_end=True)
    Trainer(model, TrainConfig(epochs=2, lr=1e-3, batch_size=64, progress=False), callbacks=[callback]).fit(
        TensorDataset(x, y)
    )
    assert isinstance(model.net[1], QuantLinear) and model.net[1].weight_bits == 4
    size = save_quantized(model, tmp_path / "qat.safetensors")
    fresh = load_quantized(LeNet300100(), tmp_path / "qat.safetensors").eval()
    assert torch.equal(fresh(x), model.eval()(x))
    weights = 784 * 300 + 300 * 100 + 100 * 10
    assert size < weights / 2 + 410 * 4 * 2 + 4096  # 4-bit codes packed two per byte


def test_mixed_precision_keeps_the_most_sensitive_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()
    with torch.no_grad():
        model[2].weight[:, ::32] *= 40  # one outlier per group makes this layer sensitive at 4 bits
    x = torch.randn(64, 64)
    ref = model(x)
    low = {"method": "weight_only", "bits": 4, "group_size": 32}
    cfg = MixedPrecisionConfig(low=low, max_high_layers=1, include=["0", "2"])
    summary = quantize_(model, cfg, calibration_data=[x])
    analysis = summary.analysis
    assert analysis["order"][0] == "2" and analysis["high"] == ["2"]
    assert analysis["sensitivity"]["2"] > 3 * analysis["sensitivity"]["0"]
    assert type(model[2]) is nn.Linear and "2" in summary.skipped
    assert sqnr_db(ref, model(x)) > 15.0
    from slimkit.quant.sensitivity import plot_sensitivity

    assert plot_sensitivity(analysis, tmp_path / "s.png").stat().st_size > 1000


def test_mixed_precision_error_budget_is_met():
    torch.manual_seed(0)
    model = LeNet300100().eval()
    x = torch.rand(64, 1, 28, 28)
    low = {"method": "int8_dynamic", "activation_granularity": "tensor"}
    summary = quantize_(model, MixedPrecisionConfig(low=low, max_error=1e-5), calibration_data=[x])
    trace = summary.analysis["trace"]
    assert trace[-1]["error"] <= 1e-5 or trace[-1]["high_layers"] == 3
    assert all(t["error"] > 1e-5 for t in trace[:-1])


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _bert_inputs(n=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize(
    ("config", "min_sqnr"),
    [
        (Int8DynamicConfig(quantize_embeddings=True), 25.0),
        (Int8StaticConfig(activation_observer="percentile"), 15.0),
        (WeightOnlyConfig(bits=4, group_size=32, algorithm="gptq"), 12.0),
        (WeightOnlyConfig(bits=8, group_size=None), 30.0),
        (Int8DynamicConfig(smoothquant=True, activation_granularity="tensor"), 20.0),
    ],
    ids=["dynamic", "static", "int4-gptq", "int8-weight-only", "smoothquant"],
)
def test_tiny_transformer_stays_close_to_float(config, min_sqnr):
    model = _tiny_bert()
    x = _bert_inputs()
    ref = model(**x).last_hidden_state
    calib = [_bert_inputs(seed=s) for s in range(1, 4)]
    summary = quantize_(model, config, calibration_data=calib)
    assert len(summary.quantized) >= 12  # q, k, v, o, ffn in/out per layer
    assert sqnr_db(ref, model(**x).last_hidden_state) > min_sqnr


def test_tiny_transformer_on_onnxruntime_matches_torch_int8(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import to_onnxruntime

    model = _tiny_bert()
    x = _bert_inputs()
    ref = model(**x).last_hidden_state
    q = copy.deepcopy(model)
    quantize_(q, Int8DynamicConfig(activation_granularity="tensor", quantize_embeddings=True))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    ort_model = to_onnxruntime(q, x, tmp_path / "tiny.onnx")
    assert not q.training and all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "tiny.onnx")).graph.node]
    # Q, K and V share one quantized input; the other Linears quantize their own.
    assert ops.count("MatMulIntegerToFloat") == 6 and ops.count("DynamicQuantizeMatMul") == 6
    assert ops.count("DynamicQuantizeLinear") == 2
    # Attention is one fused node per layer, with no NaN guards around its softmax.
    assert ops.count("MultiHeadAttention") == 2 and "IsNaN" not in ops and "Softmax" not in ops
    assert q.config._attn_implementation == model.config._attn_implementation  # the copy was changed
    out_ort = ort_model(**x)
    out_torch = q(**x).last_hidden_state
    assert sqnr_db(out_torch, out_ort) > 30.0  # the same int8 arithmetic in both runtimes
    assert sqnr_db(ref, out_ort) > 25.0
    other = _bert_inputs(n=3, length=9, seed=5)  # batch and length differ from the export example
    assert sqnr_db(q(**other).last_hidden_state, ort_model(**other)) > 30.0


def test_causal_grouped_query_model_exports_with_fused_attention(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    from slimkit.export.onnx import OrtModule, export_onnx

    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    x["attention_mask"][1, :3] = 0  # left padding
    path = export_onnx(model, x, tmp_path / "llama.onnx", output_fn=lambda out: out.logits)
    import onnx

    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("MultiHeadAttention") == 2
    with torch.inference_mode():
        ref = model(**x).logits
    got = OrtModule(path)(**x)
    real = x["attention_mask"].bool()
    assert torch.allclose(got[real], ref[real], atol=1e-4)  # causal mask and grouped KV heads kept


def test_layer_sensitivity_keeps_every_submodule_mode():
    """A BatchNorm the caller put in eval mode stays in eval mode (the model itself in train mode)."""
    from slimkit.batch import default_forward
    from slimkit.models import DigitsCNN
    from slimkit.quant.methods.int8_dynamic import Int8DynamicConfig
    from slimkit.quant.plan import build_plan
    from slimkit.quant.sensitivity import layer_sensitivity

    torch.manual_seed(0)
    model = DigitsCNN(width=4).train()
    model.features[1].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    plan = build_plan(model, Int8DynamicConfig())
    sens = layer_sensitivity(model, plan, {}, [torch.randn(4, 1, 8, 8)], default_forward)
    assert len(sens) == len(plan.layers) and all(v >= 0 for v in sens.values())
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_a_method_registered_in_a_test_runs_end_to_end_through_a_recipe(tmp_path, capsys):
    """One new method = one class and its registration: the quantize step takes its key at once."""
    import json

    import yaml

    from slimkit.cli import main

    recipe = {
        "name": "new_method",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "steps": [
            {"type": "train", "train": {"epochs": 2, "lr": 0.01, "progress": False}},
            {"type": "quantize", "name": "half", "fp16_roundtrip": {}},
        ],
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 16},
        "output": str(tmp_path / "run"),
        "overwrite": True,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with registered(HalfMethod()):
        assert main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert [r["step"] for r in rows] == ["train", "half"]
    trained, half = rows
    assert half["extra"]["quant_method"] == "fp16_roundtrip" and half["extra"]["quantized_layers"] == 2
    # the two Linear layers hold most weights: float16 storage makes the file clearly smaller
    assert half["size_bytes"] < 0.7 * trained["size_bytes"]
    assert abs(half["metrics"]["accuracy"] - trained["metrics"]["accuracy"]) <= 0.01
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2  # outside the block the method (and its key) is gone
    assert "fp16_roundtrip" in capsys.readouterr().err
