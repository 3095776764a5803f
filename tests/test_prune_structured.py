"""Structured pruning: dependency groups, consistent slicing, importance criteria, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError, ModelError
from slimkit.models.builtin import DigitsCNN, LeNet5, LeNet300100
from slimkit.prune import (
    Importance,
    StructuredConfig,
    analyze,
    load_pruned,
    prune_,
    register_importance,
    save_pruned,
)
from slimkit.prune import importance as importance_module
from slimkit.prune.importance import IMPORTANCES, make_importance
from slimkit.prune.slicers import Slicer, register_slicer, slice_layer_


class ResBlockNet(nn.Module):
    """stem -> [conv-bn-relu-conv-bn] + identity -> pool -> head: stem and conv2 are coupled by the add."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x + y).mean(dim=(2, 3)))


class TinyAttention(nn.Module):
    """A generic multi-head self-attention block (not Hugging Face) with a residual and an FFN."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, s, -1)
        h = self.norm(x + self.o(ctx))
        return h + self.ff2(torch.relu(self.ff1(h)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lenet5_channels_and_neurons_are_halved():
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(4, 1, 28, 28)
    summary = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert [g["after"] for g in summary.groups] == [3, 8, 60, 42]
    assert model.features[1].num_features == 3 and model.classifier[1].in_features == 8 * 25
    assert model(x).shape == (4, 10)
    assert summary.params_after == sum(p.numel() for p in model.parameters()) < summary.params_before / 3
    assert summary.macs_after < summary.macs_before / 3  # conv MACs fall ~4x (inputs and outputs halved)


def test_residual_block_is_pruned_consistently():
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    groups = {g.name: g for g in analyze(model, torch.randn(2, 3, 8, 8))}
    coupled = groups["stem"]
    assert set(coupled.producers) == {"stem", "conv2"} and set(coupled.followers) == {"bn0", "bn2"}
    assert set(coupled.consumers) == {"conv1", "head"} and coupled.prunable
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=torch.randn(2, 3, 8, 8))
    assert model.stem.out_channels == model.conv2.out_channels == model.conv1.in_channels == 4
    assert model.head.in_features == 4 and model(torch.randn(3, 3, 5, 5)).shape == (3, 4)


def _plant_dead_units(model: TinyAttention, head: int, neurons: list[int]) -> None:
    """Zero head ``head`` of v (its context is then 0) and make FFN neurons always-zero after ReLU."""
    d = model.head_dim
    with torch.no_grad():
        model.v.weight[head * d : (head + 1) * d] = 0
        model.v.bias[head * d : (head + 1) * d] = 0
        model.ff1.weight[neurons] = 0
        model.ff1.bias[neurons] = -1.0


def test_attention_block_heads_and_ffn_pruned_with_outputs_unchanged():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    _plant_dead_units(model, head=2, neurons=list(range(0, 128, 2)))
    x = torch.randn(3, 7, 32)
    before = model(x)
    groups = {g.kind: g for g in analyze(model, x) if g.prunable}
    assert set(groups["head"].producers) == {"q", "k", "v"} and set(groups["head"].consumers) == {"o"}
    assert set(groups["channel"].producers) == {"ff1"}  # q/k/v/o/ff2 outputs meet the residual
    calib = [torch.randn(4, 7, 32) for _ in range(2)]
    cfg = StructuredConfig(ratio=0.5, head_ratio=0.25, importance="activation")
    prune_(model, cfg, calibration=calib)
    assert model.q.out_features == model.v.out_features == model.o.in_features == 24
    assert model.ff1.out_features == 64 and model.o.out_features == 32
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert model(torch.randn(2, 11, 32)).shape == (2, 11, 32)  # any batch and sequence length


def test_all_zero_channels_removed_leave_outputs_unchanged():
    torch.manual_seed(0)
    model = DigitsCNN(dropout=0.0).eval()
    dead = [1, 5, 6, 20]
    with torch.no_grad():  # conv1 channels whose BN output is exactly 0 -> ReLU 0
        model.features[1].weight[dead] = 0
        model.features[1].bias[dead] = 0
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    cfg = StructuredConfig(ratios={"features.0": 4 / 32}, include=["features.0"], importance="activation")
    prune_(model, cfg, calibration=[x])
    assert model.features[0].out_channels == 28
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "activation", "apoz", "output", "taylor"])
def test_importance_ranks_planted_unit_last(criterion):
    torch.manual_seed(0)
    model = LeNet300100().eval()
    planted = 37
    with torch.no_grad():
        model.net[1].bias[:] = 2.0  # every other neuron is active on every input
        model.net[1].weight[planted] *= 1e-3
        model.net[1].bias[planted] = -0.01  # dead after ReLU for every input in [0, 1]
        model.net[4].weight[:, planted] *= 1e-3
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    groups = [g for g in analyze(model, x) if g.name == "net.1"]
    imp = make_importance(criterion)
    imp.prepare(model, groups, [(x, y)], None, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    scores = imp.score(model, groups[0])
    assert scores.shape == (300,)
    assert int(torch.argmin(scores)) == planted
    if criterion in ("activation", "apoz", "output", "taylor"):
        assert float(scores[planted]) == 0.0


def test_global_ranking_reaches_overall_ratio_with_min_width():
    torch.manual_seed(0)
    model = LeNet300100()
    cfg = StructuredConfig(ratio=0.5, global_ranking=True, min_width=60)
    summary = prune_(model, cfg, example_inputs=torch.randn(2, 1, 28, 28))
    after = {g["name"]: g["after"] for g in summary.groups}
    assert sum(after.values()) == 200 and min(after.values()) >= 60


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"ratio": 1.0}, ConfigError, "ratio"),
        ({"ratios": {"net.1": 1.0}}, ConfigError, "ratios.net.1"),
        ({"include": ["nothing*"]}, ConfigError, "include[0]"),
        ({"include": ["net.7"]}, ModelError, "net.7: reaches the model's output"),
        ({"importance": "taylor"}, ConfigError, "importance"),
    ],
)
def test_bad_input_is_reported_and_model_untouched(kwargs, error, needle):
    model = LeNet300100()
    before = _state(model)
    with pytest.raises(error) as err:
        prune_(model, StructuredConfig(**kwargs), example_inputs=torch.randn(2, 1, 28, 28))
    assert needle in str(err.value)
    assert _same(before, model.state_dict())


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 8, batch_first=True))
    before = _state(model)
    with pytest.raises(ModelError, match=r"0: feeds 2 \(LSTM\)"):
        prune_(model, StructuredConfig(include=["0"]), example_inputs=torch.randn(2, 3, 4))
    assert _same(before, model.state_dict())


def test_pruned_model_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = torch.randn(2, 5, 32)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    save_pruned(model, tmp_path / "p.safetensors")
    fresh = TinyAttention().eval()
    load_pruned(fresh, tmp_path / "p.safetensors")
    assert fresh.num_heads == model.num_heads == 2
    torch.testing.assert_close(fresh(x), model(x))


def test_non_mutating_analysis_keeps_mode_and_weights():
    model = LeNet5().train()
    before = _state(model)
    analyze(model, torch.randn(2, 1, 28, 28))
    assert model.training and _same(before, model.state_dict())
    copy.deepcopy(model)


class ConcatDepthwiseNet(nn.Module):
    """Two branches concatenated, then depthwise conv + BN (followers at an offset) and a pointwise conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.bn = nn.BatchNorm2d(14)
        self.pw = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(10 * 4 * 4, 3)

    def forward(self, x):
        z = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        z = torch.relu(self.pw(torch.relu(self.bn(self.dw(z)))))
        return self.fc(nn.functional.max_pool2d(z, 2).flatten(1))


def test_concat_offsets_and_depthwise_followers():
    torch.manual_seed(0)
    model = ConcatDepthwiseNet().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in analyze(model, x)}
    assert (
        groups["b"].prunable
        and groups["b"].followers["dw"].base == 8
        and groups["b"].consumers["pw"].base == 8
    )
    assert groups["pw"].consumers["fc"].stride == 16  # flatten: each channel is 4x4 features
    with torch.no_grad():  # channel 3 of branch b is dead: removing it must not change the output
        model.b.weight[3] = 0
        model.b.bias[3] = 0
        model.dw.weight[8 + 3] = 0
        model.dw.bias[8 + 3] = 0
        model.bn.bias[8 + 3] = 0
        model.bn.running_mean[8 + 3] = 0
    before = model(x)
    cfg = StructuredConfig(ratios={"b": 1 / 6}, include=["b"], importance="activation")
    prune_(model, cfg, calibration=[x])
    assert (
        model.b.out_channels == 5 and model.dw.groups == model.bn.num_features == model.pw.in_channels == 13
    )
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_depthwise_and_batchnorm_model_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = ConcatDepthwiseNet().eval()
    x = torch.randn(2, 3, 8, 8)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    save_pruned(model, tmp_path / "p.safetensors")
    fresh = ConcatDepthwiseNet().eval()
    load_pruned(fresh, tmp_path / "p.safetensors")
    assert fresh.dw.groups == fresh.dw.in_channels == model.dw.groups < 14
    torch.testing.assert_close(fresh(x), model(x))


# -- the slicer table ---------------------------------------------------------------------------


class LlamaStyleRMSNorm(nn.Module):
    """Like transformers' LlamaRMSNorm: only a 1-D weight, no normalized_shape (found by its class name)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_embedding_slicer_removes_feature_columns():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6, padding_idx=0)
    before = emb.weight.detach().clone()
    slice_layer_(emb, {0: {1, 4}})
    assert emb.weight.shape == (10, 4) and emb.embedding_dim == 4 and emb.num_embeddings == 10
    assert torch.equal(emb.weight, before[:, [0, 2, 3, 5]]) and emb.weight.requires_grad
    ids = torch.tensor([[1, 7]])
    assert emb(ids).shape == (1, 2, 4)


@pytest.mark.parametrize("norm_type", [nn.LayerNorm, nn.RMSNorm, LlamaStyleRMSNorm])
def test_norm_slicers_keep_the_remaining_features(norm_type):
    torch.manual_seed(0)
    norm = norm_type(6)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    params = {n: p.detach().clone() for n, p in norm.named_parameters()}
    kept = [0, 1, 3, 5]
    slice_layer_(norm, {0: {2, 4}})
    for name, value in params.items():
        assert torch.equal(getattr(norm, name), value[kept]), name
    if hasattr(norm, "normalized_shape"):
        assert tuple(norm.normalized_shape) == (4,)
    # The sliced norm is the norm of the kept features with their own weights.
    reference = norm_type(4)
    reference.load_state_dict({n: v[kept] for n, v in params.items()})
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(x), reference(x))


def test_norm_without_affine_and_subclass_lookup():
    class MyLinear(nn.Linear):  # found through the MRO
        pass

    norm = nn.LayerNorm(5, elementwise_affine=False)
    slice_layer_(norm, {0: {0}})
    assert norm.normalized_shape == (4,) and norm(torch.randn(2, 4)).shape == (2, 4)
    layer = MyLinear(4, 3)
    w = layer.weight.detach().clone()
    slice_layer_(layer, {0: {1}, 1: {0, 3}})
    assert (layer.out_features, layer.in_features) == (2, 2)
    assert torch.equal(layer.weight, w[[0, 2]][:, [1, 2]])


def test_embedding_and_norm_models_save_and_reload(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 8), nn.LayerNorm(8), LlamaStyleRMSNorm(8), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for i in range(4):
            slice_layer_(model[i], {1 if i == 3 else 0: {2, 5, 6}})
    ids = torch.tensor([[1, 4, 9]])
    save_pruned(model, tmp_path / "p.safetensors")
    fresh = nn.Sequential(nn.Embedding(12, 8), nn.LayerNorm(8), LlamaStyleRMSNorm(8), nn.Linear(8, 3)).eval()
    load_pruned(fresh, tmp_path / "p.safetensors")
    assert fresh[0].embedding_dim == 5 and fresh[1].normalized_shape == (5,) and fresh[3].in_features == 5
    torch.testing.assert_close(fresh(ids), model(ids))


def test_unknown_layer_type_and_duplicate_registration_are_refused():
    lstm = nn.LSTM(4, 4)
    with pytest.raises(ModelError, match=r"encoder.rnn \(LSTM\): no slicer"):
        slice_layer_(lstm, {0: {1}}, "encoder.rnn")
    with pytest.raises(ValueError, match="already registered"):

        @register_slicer(nn.Linear)
        class Again(Slicer):
            pass

    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ModelError, match="groups=2"):
        slice_layer_(grouped, {0: {0}})


# -- the importance registry --------------------------------------------------------------------


def test_every_registered_criterion_builds_from_the_same_arguments():
    for name, cls in IMPORTANCES.items():
        criterion = make_importance(name, seed=3, max_batches=2)
        assert type(criterion) is cls and criterion.max_batches == 2 and criterion.seed == 3
    assert StructuredConfig(importance="apoz").needs_calibration
    assert not StructuredConfig(importance="l1").needs_calibration


def test_custom_criterion_is_chosen_by_name_and_duplicates_are_refused(monkeypatch):
    monkeypatch.setattr(importance_module, "IMPORTANCES", dict(IMPORTANCES))

    @register_importance("last_first")
    class LastFirst(Importance):
        def score(self, model, group):
            return torch.arange(group.units, 0, -1).float()  # later units score lower

    torch.manual_seed(0)
    model = LeNet300100()
    w = model.net[1].weight.detach().clone()
    cfg = StructuredConfig(ratio=0.5, importance="last_first", include=["net.1"])
    prune_(model, cfg, example_inputs=torch.randn(2, 1, 28, 28))
    assert torch.equal(model.net[1].weight, w[:150])
    with pytest.raises(ValueError, match="already registered"):
        register_importance("l2")(LastFirst)
    with pytest.raises(ConfigError, match="last_first") as err:
        StructuredConfig(importance="nope")
    assert err.value.path == "importance"
