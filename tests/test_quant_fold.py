"""BatchNorm folding: same function in eval mode, found on the traced graph, kept through save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.models.builtin import DigitsCNN, LeNet5
from slimkit.quant import (
    Int8StaticConfig,
    fold_batchnorm_,
    load_quantized,
    quantize_,
    save_quantized,
)
from slimkit.quant.affine import sqnr_db
from slimkit.quant.modules import FoldedBatchNorm, QuantConv2d


def _with_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("build", [lambda: DigitsCNN(), lambda: LeNet5()], ids=["digits_cnn", "lenet5"])
def test_folding_keeps_the_function_and_replaces_every_batchnorm(build):
    model = _with_stats(build())
    x = torch.rand(16, 1, 8, 8) if isinstance(model, DigitsCNN) else torch.rand(16, 1, 28, 28)
    ref = model(x)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    folded = fold_batchnorm_(model, x)
    assert sorted(folded) == sorted(bns) and len(bns) == 2
    assert all(isinstance(model.get_submodule(n), FoldedBatchNorm) for n in bns)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)


class _Residual(nn.Module):
    """The conv output is read by the BatchNorm and by the skip connection: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_a_conv_read_by_more_than_the_batchnorm_is_not_folded():
    model = _with_stats(_Residual())
    x = torch.randn(2, 4, 6, 6)
    ref = model(x)
    assert fold_batchnorm_(model, x) == {"bn2": "conv2"}
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_static_quantization_folds_and_reloads(tmp_path):
    model = _with_stats(DigitsCNN())
    fresh = copy.deepcopy(model)
    x = torch.rand(64, 1, 8, 8)
    ref = model(x)
    result = quantize_(model, Int8StaticConfig(), calibration_data=[x[:32], x[32:]])
    assert result.folded == {"features.1": "features.0", "features.4": "features.3"}
    assert isinstance(model.features[0], QuantConv2d) and isinstance(model.features[1], FoldedBatchNorm)
    assert sqnr_db(ref, model(x)) > 30.0
    save_quantized(model, tmp_path / "q.safetensors")
    load_quantized(fresh, tmp_path / "q.safetensors")
    assert isinstance(fresh.features[4], FoldedBatchNorm)
    assert torch.equal(fresh(x), model(x))


def test_folding_can_be_switched_off_and_tracing_does_not_count_as_calibration():
    x = torch.rand(64, 1, 8, 8)
    scales = {}
    for fold in (True, False):
        torch.manual_seed(0)
        model = _with_stats(DigitsCNN())
        cfg = Int8StaticConfig(activation_observer="moving_average", fold_batchnorm=fold)
        result = quantize_(model, cfg, calibration_data=[x[:32], 3 * x[32:]])
        assert bool(result.folded) is fold
        assert isinstance(model.features[1], FoldedBatchNorm if fold else nn.BatchNorm2d)
        scales[fold] = [model.features[i].x_scale.item() for i in (0, 3)]
    # a moving average would move if the tracing pass had been observed as a third batch
    assert scales[True] == scales[False]


def test_fold_batchnorm_must_be_a_boolean():
    with pytest.raises(ConfigError, match="fold_batchnorm"):
        Int8StaticConfig(fold_batchnorm="yes")


def test_folding_under_inference_mode_leaves_a_model_usable_outside_it():
    model = _with_stats(DigitsCNN())
    x = torch.rand(4, 1, 8, 8)
    ref = model(x)
    with torch.inference_mode():
        fold_batchnorm_(model, x)
    assert torch.allclose(model(x), ref, atol=1e-5)  # autograd-tracked call: parameters are normal tensors
