"""Unstructured magnitude pruning, masks during training, and sparse files."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.errors import ConfigError, ModelError
from slimkit.models.builtin import LeNet5, LeNet300100
from slimkit.prune import (
    GradualConfig,
    GradualPruningCallback,
    MagnitudeConfig,
    MaskCallback,
    PruneSummary,
    finalize_,
    load_sparse,
    prune_,
    save_sparse,
)
from slimkit.prune.methods import register_method
from slimkit.train import TrainConfig, Trainer


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet300100()


def _zeros(p: torch.Tensor) -> int:
    return int((p == 0).sum())


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.975])
def test_layerwise_sparsity_is_exact(sparsity):
    model = _mlp()
    masks = prune_(model, MagnitudeConfig(sparsity=sparsity)).masks
    for name, mask in masks.items():
        p = model.get_parameter(name)
        assert _zeros(p) == round(sparsity * p.numel())
        assert torch.equal(p != 0, mask)


def test_global_sparsity_is_exact_and_uneven_per_layer():
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.8, scope="global"))
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    assert sum(_zeros(w) for w in weights) == round(0.8 * total)
    per_layer = [_zeros(w) / w.numel() for w in weights]
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold, not one fraction per layer


def test_threshold_and_patterns():
    model = _mlp()
    before = model.net[7].weight.clone()
    masks = prune_(model, MagnitudeConfig(threshold=0.03, exclude=["net.7"])).masks
    assert "net.7.weight" not in masks
    assert torch.equal(model.net[7].weight, before)
    w = model.net[1].weight
    assert _zeros(w) > 0 and float(w.detach()[w != 0].abs().min()) > 0.03


def test_n_m_pattern_keeps_two_of_four():
    model = _mlp()
    prune_(model, MagnitudeConfig(n_m="2:4", include=["net.1", "net.4"]))
    blocks = (model.net[1].weight != 0).reshape(-1, 4).sum(1)
    assert torch.all(blocks == 2)
    with pytest.raises(ModelError, match="net.7"):
        prune_(_mlp(), MagnitudeConfig(n_m="2:3", include=["net.7"]))  # 100 inputs, not a multiple of 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "include": ["nope*"]}, "include[0]"),
        ({"sparsity": 0.5, "exclude": ["missing"]}, "exclude[0]"),
        ({"sparsity": 0.5, "module_types": ["LSTM"]}, "module_types[0]"),
        ({"n_m": "4:2"}, "n_m"),
        ({}, "sparsity"),
    ],
)
def test_bad_input_names_field_and_leaves_model_untouched(kwargs, field):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        prune_(model, MagnitudeConfig(**kwargs))
    assert err.value.path == field
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_survive_momentum_and_weight_decay(optimizer):
    model = _mlp()
    data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    # Train dense first so the optimizer-free weights have moved; then prune and keep training.
    masks = prune_(model, MagnitudeConfig(sparsity=0.9, scope="global")).masks
    cfg = TrainConfig(
        epochs=2, batch_size=32, optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=0.01, progress=False
    )
    before = {n: model.get_parameter(n).clone() for n in masks}
    Trainer(model, cfg, callbacks=[MaskCallback(masks)]).fit(data)
    for name, mask in masks.items():
        p = model.get_parameter(name)
        assert torch.all(p[~mask] == 0)
        assert not torch.equal(p, before[name])  # the kept weights did train
    finalize_(model, masks)
    assert not masks


def test_without_callback_weights_revive():
    """The control for the test above: momentum/weight decay alone do not keep zeros."""
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.9))
    data = TensorDataset(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    Trainer(model, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05, progress=False)).fit(data)
    assert _zeros(model.net[1].weight) < 0.5 * model.net[1].weight.numel()


def test_gradual_schedule_reaches_final_sparsity():
    model = _mlp()
    cfg = GradualConfig(
        final_sparsity=0.8, start_step=0, end_step=12, frequency=4, include=["net.1", "net.4"]
    )
    assert cfg.sparsity_at(0) == 0.0 and cfg.sparsity_at(12) == pytest.approx(0.8)
    assert cfg.sparsity_at(6) == pytest.approx(0.8 - 0.8 * 0.5**3)
    cb = GradualPruningCallback(model, cfg)
    data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    Trainer(model, TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.01, progress=False), [cb]).fit(
        data
    )
    assert [s for _, s in cb.history][-1] == pytest.approx(0.8)
    sparsities = [s for _, s in cb.history]
    assert sparsities == sorted(sparsities)
    w = model.net[1].weight
    assert _zeros(w) / w.numel() == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("compress", [False, True])
def test_sparse_round_trip_is_bit_exact_and_small(tmp_path, compress):
    model = LeNet5()
    prune_(model, MagnitudeConfig(sparsity=0.9, scope="global"))
    model.features[0].weight.data[0, 0, 0, 0] = -0.0  # sign of zero must survive
    dense = tmp_path / "dense.safetensors"
    from slimkit.utils.io import save_weights

    dense_size = save_weights(model, dense)
    size = save_sparse(model, tmp_path / "sparse.safetensors", compress=compress)
    assert size * 5 < dense_size
    fresh = LeNet5()
    load_sparse(fresh, tmp_path / "sparse.safetensors")
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(
            a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        ), k


def test_load_sparse_rejects_wrong_model(tmp_path):
    save_sparse(LeNet5(), tmp_path / "w.safetensors")
    model = LeNet300100()
    before = model.net[1].weight.clone()
    with pytest.raises(ModelError, match="does not fit"):
        load_sparse(model, tmp_path / "w.safetensors")
    assert torch.equal(before, model.net[1].weight)


def test_iterative_prune_and_retrain_cycles():
    from slimkit.prune import prune_iteratively_
    from slimkit.prune.unstructured import iterative_sparsities

    targets = iterative_sparsities(0.9, 3)
    assert targets[-1] == pytest.approx(0.9) and targets == sorted(targets)
    assert 1 - targets[0] == pytest.approx(0.1 ** (1 / 3))
    model = _mlp()
    data = TensorDataset(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    seen = []

    def retrain(m, callback):
        cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, progress=False)
        Trainer(m, cfg, callbacks=[callback]).fit(data)
        seen.append(_zeros(m.net[1].weight) / m.net[1].weight.numel())

    masks = prune_iteratively_(model, MagnitudeConfig(sparsity=0.9, include=["net.1"]), 3, retrain)
    assert seen == pytest.approx(targets, abs=1e-3)
    assert masks.sparsity() == pytest.approx(0.9, abs=1e-3)


# -- one verb for every method: prune_ -> PruneSummary -------------------------------------------


def test_magnitude_summary_has_masks_callback_and_sparsity():
    model = _mlp()
    summary = prune_(model, MagnitudeConfig(sparsity=0.5, include=["net.1"]))
    assert isinstance(summary, PruneSummary) and summary.method == "magnitude"
    assert isinstance(summary.callback, MaskCallback) and summary.callback.masks is summary.masks
    assert list(summary.masks) == ["net.1.weight"] and summary.sparsity == pytest.approx(0.5)
    assert summary.params_before == summary.params_after == sum(p.numel() for p in model.parameters())
    assert "net.1.weight" in summary.table() and "50.0%" in summary.table()
    with pytest.raises(TypeError, match="magnitude pruning takes no extra arguments"):
        prune_(model, MagnitudeConfig(sparsity=0.5), calibration=[])


def test_gradual_summary_changes_nothing_until_training():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GradualConfig(final_sparsity=0.5, end_step=4, frequency=2, include=["net.1"])
    summary = prune_(model, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert summary.method == "gradual" and summary.sparsity is None
    assert isinstance(summary.callback, GradualPruningCallback) and summary.masks is summary.callback.masks
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    Trainer(model, TrainConfig(epochs=1, batch_size=16, lr=0.01, progress=False), [summary.callback]).fit(
        data
    )
    assert summary.masks.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_prune_dispatch_table_refuses_unknown_configs_and_duplicates():
    with pytest.raises(TypeError, match="prune_ needs one of .*got dict") as err:
        prune_(_mlp(), {"sparsity": 0.5})
    assert all(name in str(err.value) for name in ("MagnitudeConfig", "GradualConfig", "StructuredConfig"))
    with pytest.raises(ValueError, match="already registered"):
        register_method(MagnitudeConfig)(lambda model, config: None)
