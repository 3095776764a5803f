"""Quantization: affine math, observers, configs, integer modules, the API's checks, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.models.builtin import DigitsCNN, LeNet5, LeNet300100
from slimkit.quant import (
    BF16Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    WeightOnlyConfig,
    calibrate,
    config_from_dict,
    convert_,
    load_quantized,
    prepare_,
    quantize_,
    save_quantized,
)
from slimkit.quant.affine import (
    QSpec,
    dequantize,
    minmax,
    pack_int4,
    param_shape,
    qparams,
    quantize,
    quantize_tensor,
    sqnr_db,
    unpack_int4,
)
from slimkit.quant.kernels import int4_compute_dtype
from slimkit.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear, WeightOnlyLinear
from slimkit.quant.observers import make_observer


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


SPECS = [
    QSpec(8, True, "tensor"),
    QSpec(8, False, "tensor"),
    QSpec(8, True, "channel", 0),
    QSpec(8, False, "channel", 1),
    QSpec(4, True, "channel", 0),
    QSpec(4, False, "group", 0, 32),
    QSpec(4, True, "group", 0, 64),
    QSpec(8, False, "group", 0, 128),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'asym'}-{s.granularity}"
)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(spec):
    torch.manual_seed(0)
    x = torch.randn(48, 256) * torch.linspace(0.1, 5, 256) + 0.3
    q, scale, zero = quantize_tensor(x, spec)
    assert q.dtype == torch.int8
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    err = (x - dequantize(q, scale, zero, spec)).abs()
    from slimkit.quant.affine import _expand

    step = _expand(scale, x, spec)
    assert bool((err <= step / 2 + 1e-6 * step.max()).all())


def test_values_outside_the_range_clamp_to_the_ends():
    spec = QSpec(8, True, "tensor")
    scale, zero = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    q = quantize(torch.tensor([100.0, -100.0, 0.05]), scale, zero, spec)
    assert q.tolist() == [127, -127, 0]  # 0.05 / 0.1 = 0.5 rounds half to even


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (QSpec(8, True, "tensor"), ()),
        (QSpec(8, True, "channel", 0), (12,)),
        (QSpec(8, False, "channel", 1), (64,)),
        (QSpec(4, True, "group", 0, 32), (12, 2)),
        (QSpec(4, True, "group", 0, 16), (12, 4)),
    ],
)
def test_scale_and_zero_point_shapes_per_granularity(spec, shape):
    x = torch.randn(12, 64)
    scale, zero = qparams(*minmax(x, spec), spec)
    assert tuple(scale.shape) == shape == param_shape(x.shape, spec)
    assert tuple(zero.shape) == shape and zero.dtype == torch.int32
    if spec.symmetric:
        assert bool((zero == 0).all())


def test_conv_weight_groups_follow_the_flattened_kernel():
    w = torch.randn(8, 4, 3, 3)  # 36 values per output channel
    spec = QSpec(4, True, "group", 0, 12)
    q, scale, zero = quantize_tensor(w, spec)
    assert tuple(scale.shape) == (8, 3)
    assert (w - dequantize(q, scale, zero, spec)).abs().max() <= scale.max() / 2 + 1e-6


def test_group_size_must_divide_the_channel():
    with pytest.raises(ValueError, match="group_size 32 does not divide"):
        quantize_tensor(torch.randn(4, 48), QSpec(4, True, "group", 0, 32))


def test_int4_packing_round_trip_and_size():
    q = torch.randint(-8, 8, (10, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (10, 32)
    assert torch.equal(unpack_int4(packed), q)


def test_observers_pick_ranges_as_documented():
    spec = QSpec(8, False, "tensor")
    data = [torch.randn(1000), torch.randn(1000) * 3]
    data[1][0] = 50.0  # one outlier
    ranges = {}
    for kind in ("minmax", "moving_average", "percentile", "mse"):
        obs = make_observer(kind, spec, percentile=99.0, momentum=0.5)
        for d in data:
            obs.update(d)
        ranges[kind] = float(obs.range()[1])
    assert ranges["minmax"] == 50.0
    assert ranges["moving_average"] == pytest.approx(0.5 * float(data[0].max()) + 0.5 * 50.0)
    assert ranges["percentile"] < 10.0  # the outlier is clipped
    scales = {}
    many = torch.randn(20_000)
    many[0] = 50.0
    for kind in ("minmax", "mse"):
        # At 4 bits the rounding error of the full range costs more than clipping one value in 20k.
        obs = make_observer(kind, QSpec(4, False, "tensor"))
        obs.update(many)
        scales[kind] = float(obs.qparams()[0])
    assert scales["mse"] < 0.8 * scales["minmax"]  # MSE shrinks a range that an outlier dominates


def test_observer_without_data_says_so():
    with pytest.raises(RuntimeError, match="seen no data"):
        make_observer("minmax", QSpec()).qparams()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"method": "int3"}, "method"),
        ({"method": "weight_only", "bits": 3}, "bits"),
        ({"method": "weight_only", "bits": 4, "group_size": 48}, "group_size"),
        ({"method": "weight_only", "bits": 8, "group_size": 32}, "group_size"),
        ({"method": "int8_static", "activation_observer": "histogram"}, "activation_observer"),
        (
            {"method": "int8_dynamic", "overrides": {"fc*": {"weight_observer": "max"}}},
            "overrides.fc*.weight_observer",
        ),
        ({"method": "mixed"}, "max_error"),
        ({"method": "mixed", "high": {"method": "int8_static"}, "max_error": 0.1}, "high"),
        ({"method": "qat", "weight_bits": 2}, "weight_bits"),
    ],
)
def test_bad_configs_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert err.value.path == field


def test_config_from_dict_builds_overrides():
    cfg = config_from_dict(
        {"method": "int8_static", "overrides": {"net.7": None, "net.1": {"method": "bf16"}}}
    )
    assert isinstance(cfg, Int8StaticConfig)
    assert cfg.overrides["net.7"] is None and isinstance(cfg.overrides["net.1"], BF16Config)


def test_weight_only_group_size_defaults_by_bit_width():
    # A recipe cannot write null for a setting it leaves out: 8 bits must work without group_size.
    assert config_from_dict({"method": "weight_only", "bits": 8}).group_size is None
    assert config_from_dict({"method": "weight_only", "bits": 4}).group_size == 128
    with pytest.raises(ConfigError, match="group_size"):
        config_from_dict({"method": "weight_only", "bits": 8, "group_size": 64})


def _lenet_data(n=64):
    torch.manual_seed(0)
    return torch.rand(n, 1, 28, 28)


@pytest.mark.parametrize(
    "config",
    [
        Int8DynamicConfig(),
        Int8DynamicConfig(activation_granularity="tensor"),
        Int8StaticConfig(),
        Int8StaticConfig(activation_observer="mse"),
        Int8StaticConfig(activation_observer="percentile"),
        Int8StaticConfig(smoothquant=True),
        Int8DynamicConfig(smoothquant=True),
    ],
    ids=lambda c: (
        f"{c.method}-{getattr(c, 'activation_observer', getattr(c, 'activation_granularity', ''))}"
        + ("-sq" if c.smoothquant else "")
    ),
)
def test_int8_builtin_models_stay_close_to_float(config):
    mnist, digits = _lenet_data(), torch.rand(64, 1, 8, 8)
    for model, x in ((LeNet5().eval(), mnist), (LeNet300100().eval(), mnist), (DigitsCNN().eval(), digits)):
        ref = model(x)
        summary = quantize_(model, config, calibration_data=[x[:32], x[32:]])
        assert summary.quantized and not summary.skipped
        assert any(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules())
        assert sqnr_db(ref, model(x)) > 30.0


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        dict(kernel_size=1),
        dict(kernel_size=5, stride=2),
    ],
)
def test_int8_conv_equals_float_conv_of_the_dequantized_operands(conv):
    """Patches, column order and rescaling: the integer path is exact up to float rounding."""
    torch.manual_seed(0)
    float_conv = nn.Conv2d(6, 10, **conv).eval()
    x = torch.randn(3, 6, 13, 11)
    model = nn.Sequential(copy.deepcopy(float_conv))
    quantize_(model, Int8StaticConfig(), calibration_data=[x])
    q = model[0]
    assert isinstance(q, QuantConv2d)
    xq = torch.clamp(torch.round(x / q.x_scale) + q.x_zero, -128, 127)
    x_deq = (xq - q.x_zero) * q.x_scale
    w_deq = q.weight()
    expected = nn.functional.conv2d(
        x_deq, w_deq, q.bias(), float_conv.stride, float_conv.padding, float_conv.dilation
    )
    got = q(x)
    assert got.shape == float_conv(x).shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert sqnr_db(float_conv(x), got) > 30.0


@pytest.mark.parametrize(
    "config",
    [Int8StaticConfig(), Int8DynamicConfig(activation_granularity="tensor"), Int8DynamicConfig()],
    ids=["static", "dynamic-tensor", "dynamic-token"],
)
def test_slicing_into_small_pieces_changes_no_output_bit(config, monkeypatch):
    """Slices bound memory, not maths: one slice per row or image gives the very same outputs."""
    import slimkit.quant.kernels as kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9 * 9, 16))
    x = torch.randn(5, 3, 9, 9)
    quantize_(model.eval(), config, calibration_data=[x])
    whole = model(x)
    monkeypatch.setattr(kernels, "rows_per_slice", lambda bytes_per_row: 1)
    assert torch.equal(model(x), whole)
    assert model(x.bfloat16()).dtype == torch.bfloat16  # outputs keep the caller's dtype


def test_quantized_under_inference_mode_runs_in_and_out_of_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    with torch.inference_mode():
        quantize_(model, Int8StaticConfig(), calibration_data=[x])
        inside = model(x)
    assert torch.equal(model(x), inside) and sqnr_db(ref, inside) > 30.0


def test_static_layer_follows_buffers_loaded_after_first_use():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    x = torch.randn(4, 16)
    quantize_(model, Int8StaticConfig(), calibration_data=[x])
    first = model(x)
    state = copy.deepcopy(model.state_dict())
    state["0.x_scale"] = state["0.x_scale"] * 2  # a coarser activation grid must change the outputs
    model.load_state_dict(state)
    assert not torch.equal(model(x), first)
    model.load_state_dict({k: v / 2 if k == "0.x_scale" else v for k, v in state.items()})
    assert torch.equal(model(x), first)


def test_weight_only_int8_and_int4_on_real_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    x = torch.randn(32, 128)
    ref = model(x)
    m8, m4 = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(m8, WeightOnlyConfig(bits=8, group_size=None))
    quantize_(m4, WeightOnlyConfig(bits=4, group_size=32))
    assert isinstance(m4[0], WeightOnlyLinear) and m4[0].qweight.dtype == torch.uint8
    assert tuple(m4[0].qweight.shape) == (256, 64)  # two codes per byte
    assert sqnr_db(ref, m8(x)) > 35.0
    assert sqnr_db(ref, m4(x)) > 15.0
    # The kernel computes what the stored codes say.
    w = m4[0].weight()
    # The int4 kernel computes in bf16 where the CPU has it (10-70x faster there), else in float32.
    tol = 1e-3 if int4_compute_dtype() == torch.float32 else 2e-2
    assert torch.allclose(m4[0](x), x @ w.t() + m4[0].bias(), atol=tol, rtol=tol)


def test_bf16_layers_compute_in_bfloat16():
    model = LeNet300100().eval()
    x = _lenet_data()
    ref = model(x)
    quantize_(model, BF16Config())
    assert model.net[1].weight.dtype == torch.bfloat16
    assert sqnr_db(ref, model(x)) > 30.0


def test_embeddings_are_quantized_per_row():
    emb = nn.Embedding(100, 16)
    model = nn.Sequential(emb, nn.Linear(16, 4)).eval()
    ids = torch.randint(0, 100, (3, 5))
    ref = model(ids)
    quantize_(model, Int8DynamicConfig(quantize_embeddings=True))
    assert isinstance(model[0], QuantEmbedding)
    assert sqnr_db(ref, model(ids)) > 30.0


def test_overrides_keep_layers_float_or_switch_method():
    model = LeNet300100().eval()
    cfg = Int8DynamicConfig(overrides={"net.7": None, "net.4": WeightOnlyConfig(bits=8, group_size=None)})
    summary = quantize_(model, cfg)
    assert isinstance(model.net[1], QuantLinear)
    assert isinstance(model.net[4], WeightOnlyLinear)
    assert type(model.net[7]) is nn.Linear
    assert "net.7" in summary.skipped


@pytest.mark.parametrize(
    ("config", "match", "error"),
    [
        (Int8DynamicConfig(include=["nothing.*"]), "pattern 'nothing.*' matches no module", ConfigError),
        (Int8DynamicConfig(overrides={"fc9": None}), "pattern 'fc9' matches no module", ConfigError),
        (WeightOnlyConfig(bits=4, group_size=128), "no layer that weight_only can quantize", ModelError),
        ({"method": "weight_only", "bits": 5}, "bits", ConfigError),
    ],
)
def test_bad_input_raises_and_leaves_the_model_untouched(config, match, error):
    model = LeNet300100().eval()
    before = _state(model)
    with pytest.raises(error, match=match):
        quantize_(model, config)
    assert _same(model, before) and type(model.net[1]) is nn.Linear and not model.training


def test_weights_of_an_unsupported_dtype_are_named():
    model = LeNet300100().eval().to(torch.float64)
    with pytest.raises(ModelError, match=r"net.1: weight dtype torch.float64 cannot be quantized"):
        quantize_(model, Int8DynamicConfig())
    assert type(model.net[1]) is nn.Linear


def test_model_without_quantizable_layer():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(ModelError, match="no layer that int8_dynamic can quantize"):
        quantize_(model, Int8DynamicConfig())


def test_calibration_batch_of_the_wrong_shape_names_it_and_rolls_back():
    model = LeNet300100().eval()
    before = _state(model)
    good, bad = _lenet_data(8), torch.rand(8, 1, 20, 20)
    with pytest.raises(DataError, match=r"calibration batch 1 \(tensor of shape \(8, 1, 20, 20\)\)"):
        quantize_(model, Int8StaticConfig(), calibration_data=[good, bad])
    assert _same(model, before) and type(model.net[1]) is nn.Linear
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_static_needs_calibration_data():
    with pytest.raises(ConfigError, match="calibration_data: int8_static needs calibration batches"):
        quantize_(LeNet300100(), Int8StaticConfig())


def test_explicit_prepare_calibrate_convert():
    model = LeNet5().eval()
    x = _lenet_data()
    ref = model(x)
    plan = prepare_(model, {"method": "int8_static", "activation_observer": "moving_average"})
    assert set(plan.layers) == {"features.0", "features.4", "classifier.1", "classifier.4", "classifier.7"}
    with pytest.raises(DataError, match="saw no input"):
        convert_(model)
    assert calibrate(model, [x[:32], x[32:]]) == 2
    convert_(model)
    assert isinstance(model.features[0], QuantConv2d) and model.features[0].x_scale > 0
    assert sqnr_db(ref, model(x)) > 30.0
    with pytest.raises(ModelError, match="not prepared"):
        calibrate(model, [x])


def test_save_load_round_trip_and_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
    model.eval()
    fresh = copy.deepcopy(model)
    x = torch.randn(16, 256)
    cfg = WeightOnlyConfig(bits=4, group_size=64, overrides={"4": Int8StaticConfig()})
    quantize_(model, cfg, calibration_data=[x])
    size = save_quantized(model, tmp_path / "q.safetensors")
    n4 = 256 * 512 + 512 * 128
    groups = n4 // 64
    # int4 codes two per byte + fp32 scale and int8 zero per group; int8 layer: codes + fp32 scale
    # per channel + activation scale/zero; fp32 biases. The rest is the safetensors header.
    payload = n4 // 2 + groups * (4 + 1) + (128 * 10 + 10 * 4 + 8) + (512 + 128 + 10) * 4
    assert payload <= size <= payload + 4096
    load_quantized(fresh, tmp_path / "q.safetensors")
    assert isinstance(fresh[0], WeightOnlyLinear) and isinstance(fresh[4], QuantLinear)
    assert torch.equal(fresh(x), model(x))


def test_save_rejects_float_models_and_load_rejects_other_files(tmp_path):
    with pytest.raises(ModelError, match="no quantized layer"):
        save_quantized(LeNet300100(), tmp_path / "x.safetensors")
    from slimkit.utils.io import save_weights

    save_weights(LeNet300100(), tmp_path / "plain.safetensors")
    with pytest.raises(ModelError, match="not a slimkit quantized model"):
        load_quantized(LeNet300100(), tmp_path / "plain.safetensors")


def test_int4_compute_dtype_follows_the_cpu(monkeypatch):
    """bf16 wherever ATen runs vector code (the kernel's fast path), float32 without it; env overrides."""
    from slimkit.quant import kernels
    from slimkit.utils import cpu

    cases = (
        ("DEFAULT", [], torch.float32),
        ("AVX2", ["avx2"], torch.bfloat16),
        ("AVX512", ["avx2", "avx512_bf16"], torch.bfloat16),
    )
    monkeypatch.delenv(kernels.INT4_COMPUTE_ENV, raising=False)
    try:
        for capability, flags, want in cases:
            monkeypatch.setattr(cpu, "capability", lambda c=capability, f=flags: {"torch": c, "flags": f})
            kernels.int4_compute_dtype.cache_clear()
            assert kernels.int4_compute_dtype() == want
        monkeypatch.setenv(kernels.INT4_COMPUTE_ENV, "fp32")
        kernels.int4_compute_dtype.cache_clear()
        assert kernels.int4_compute_dtype() == torch.float32
    finally:
        monkeypatch.undo()
        kernels.int4_compute_dtype.cache_clear()
