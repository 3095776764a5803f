"""SmoothQuant for W8A8 dynamic int8: ``smoothquant_alpha: auto`` searched per layer on calibration rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.config import from_dict
from slimkit.errors import ConfigError
from slimkit.quant import Int8DynamicConfig, load_quantized, quantize_, save_quantized
from slimkit.quant.base import config_from_dict
from slimkit.quant.builders import auto_smoothquant_alpha, w8a8_output
from slimkit.quant.scale_search import row_relative_mse
from slimkit.quant.smoothquant import chosen_alphas, smoothing_factors


def _outlier_layer() -> tuple[nn.Linear, list[torch.Tensor]]:
    """A Linear with uneven weight columns, and calibration inputs where three channels are 20-60x the rest."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.3, 3.0, 128)[torch.randperm(128)])
    scales = torch.ones(128)
    scales[[3, 17, 90]] = torch.tensor([30.0, 60.0, 20.0])
    batches = [torch.randn(128, 128, generator=torch.Generator().manual_seed(s)) * scales for s in range(4)]
    return lin, batches


def _quantized(lin: nn.Linear, config: Int8DynamicConfig, batches) -> nn.Sequential:
    model = nn.Sequential(copy.deepcopy(lin))
    quantize_(model, config, calibration_data=batches)
    return model


def _auto(**kw) -> Int8DynamicConfig:
    return Int8DynamicConfig(smoothquant=True, smoothquant_alpha="auto", **kw)


def test_auto_alpha_beats_no_smoothing_and_is_no_worse_than_half_on_the_calibration_rows():
    lin, batches = _outlier_layer()
    x = torch.cat(batches)  # 512 rows: all of them are the search's sample (smoothquant_samples=512)
    with torch.no_grad():
        ref = lin(x)
        err = {  # the search's own measure: squared error relative to each row's size (tokens count alike)
            name: row_relative_mse(_quantized(lin, cfg, batches)(x), ref)
            for name, cfg in {
                "none": Int8DynamicConfig(),
                "half": Int8DynamicConfig(smoothquant=True, smoothquant_alpha=0.5),
                "auto": _auto(),
            }.items()
        }
    # measured: none 1.33e-3, alpha 0.5 4.93e-5, auto 4.56e-5
    assert err["auto"] < 0.05 * err["none"], err
    assert err["auto"] <= err["half"] * (1 + 1e-6), err


def test_the_search_scores_the_runtime_computation_and_the_choice_is_visible():
    lin, batches = _outlier_layer()
    x, cfg = torch.cat(batches), _auto()
    model = nn.Sequential(copy.deepcopy(lin))
    summary = quantize_(model, cfg, calibration_data=batches)
    w, absmax = lin.weight.detach(), x.abs().amax(dim=0)
    alpha, errors = auto_smoothquant_alpha(w, absmax, x, cfg)
    assert list(errors) == [None, *(i / 20 for i in range(21))]  # no smoothing, then 0, 0.05, ..., 1
    assert errors[alpha] == min(errors.values()) and errors[alpha] < errors[None]
    layer = model[0]
    assert layer.smoothquant_alpha == alpha == chosen_alphas(model)["0"]
    assert summary.quantized["0"].endswith(f"smoothquant alpha {alpha:g}")
    # What the search scored is what the layer computes, bit for bit.
    with torch.no_grad():
        scored = w8a8_output(x, w, smoothing_factors(absmax, w, alpha), cfg) + lin.bias
        assert torch.equal(layer(x), scored)


def test_the_chosen_alpha_survives_save_and_load(tmp_path):
    lin, batches = _outlier_layer()
    model = _quantized(lin, _auto(smoothquant_grid=10), batches)
    save_quantized(model, tmp_path / "q.safetensors")
    loaded = load_quantized(nn.Sequential(copy.deepcopy(lin)), tmp_path / "q.safetensors")
    x = torch.cat(batches)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert chosen_alphas(loaded) == chosen_alphas(model) and chosen_alphas(model)["0"] is not None


def test_a_layer_that_smoothing_does_not_help_stays_unsmoothed():
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    batches = [torch.randn(64, 64) for _ in range(2)]  # no outlier channels: nothing to move
    model = _quantized(lin, _auto(), batches)
    alpha = model[0].smoothquant_alpha
    x = torch.cat(batches)
    _, errors = auto_smoothquant_alpha(lin.weight.detach(), x.abs().amax(dim=0), x, _auto())
    assert errors[alpha] == min(errors.values())
    assert (model[0].in_scale is None) == (alpha is None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smoothquant": True, "smoothquant_alpha": 1.5}, "smoothquant_alpha: must be in [0.0, 1.0]"),
        (
            {"smoothquant": True, "smoothquant_alpha": "best"},
            "smoothquant_alpha: must be a number in [0, 1] or",
        ),
        ({"smoothquant_alpha": "auto"}, "smoothquant_alpha: 'auto' needs smoothquant: true"),
        ({"smoothquant": True, "smoothquant_grid": 0}, "smoothquant_grid"),
        ({"smoothquant": True, "smoothquant_samples": 0}, "smoothquant_samples"),
    ],
)
def test_bad_smoothquant_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        Int8DynamicConfig(**kwargs)
    assert message in str(err.value)
    with pytest.raises(ConfigError) as err:  # the recipe form too
        config_from_dict({"method": "int8_dynamic", **kwargs})
    assert "smoothquant_" in str(err.value)


def test_recipe_form_accepts_auto_and_numbers():
    cfg = config_from_dict({"method": "int8_dynamic", "smoothquant": True, "smoothquant_alpha": "auto"})
    assert cfg.smoothquant_alpha == "auto" and cfg.needs_calibration
    assert (
        from_dict(Int8DynamicConfig, {"smoothquant": True, "smoothquant_alpha": 0.8}).smoothquant_alpha == 0.8
    )
    assert Int8DynamicConfig().smoothquant_alpha == 0.5  # the old default stays
