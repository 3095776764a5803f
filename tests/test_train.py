"""Training core: determinism, exact resume, early stopping, regularisation, schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.errors import ConfigError
from slimkit.train import Callback, TrainConfig, Trainer, cross_validate
from slimkit.train.optim import lr_factor


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))


def _accuracy(data):
    x, y = data.tensors

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return {
            "loss": float(nn.functional.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean()),
        }

    return evaluate


def _cfg(**kw):
    base = dict(
        epochs=3,
        batch_size=32,
        lr=0.05,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=1e-3,
        progress=False,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_learns_and_reports_history():
    data = _data()
    result = Trainer(_model(), _cfg(epochs=5), evaluate=_accuracy(data)).fit(data, data)
    assert len(result.history) == 5
    assert result.history[-1]["val_accuracy"] > 0.9
    assert result.steps == 5 * 8
    assert result.samples_per_s > 0


def test_same_seed_same_weights():
    data = _data()
    a, b = _model(), _model()
    Trainer(a, _cfg()).fit(data)
    Trainer(b, _cfg()).fit(data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = _model()
    Trainer(c, _cfg(seed=8)).fit(data)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_equals_straight_run(tmp_path, optimizer):
    data = _data(250)  # a ragged last batch, and k falls mid-epoch
    cfg = _cfg(optimizer=optimizer, lr=0.01, schedule="cosine", warmup_steps=3, epochs=3)
    straight = _model()
    Trainer(straight, cfg).fit(data)

    partial = _model()
    first = Trainer(partial, _cfg(**{**cfg.__dict__, "max_steps": 11}))
    first.fit(data)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed_model = _model(seed=99)  # different init: everything must come from the checkpoint
    torch.manual_seed(12345)  # and the global RNG is disturbed
    Trainer(resumed_model, cfg).fit(data, resume_from=tmp_path / "ckpt")
    for pa, pb in zip(straight.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_early_stopping_restores_best():
    data = _data()
    scores = iter([0.5, 0.8, 0.7, 0.6, 0.9, 0.95])
    snapshots = []

    def evaluate(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scores)}

    model = _model()
    result = Trainer(
        model, _cfg(epochs=6, early_stopping_patience=2, monitor="val_accuracy"), evaluate=evaluate
    ).fit(data, data)
    assert result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 2 and result.best_metric == 0.8
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k])


def test_l1_penalty_shrinks_weights_more():
    data = _data()
    plain, sparse = _model(), _model()
    Trainer(plain, _cfg(epochs=4, weight_decay=0.0)).fit(data)
    Trainer(sparse, _cfg(epochs=4, weight_decay=0.0, l1=1e-2)).fit(data)
    l1 = lambda m: sum(p.abs().sum() for p in m.parameters() if p.dim() > 1)  # noqa: E731
    assert l1(sparse) < 0.8 * l1(plain)


def test_l2_penalty_equals_sgd_weight_decay():
    data = _data()
    a, b = _model(), _model()
    Trainer(a, _cfg(momentum=0.0, weight_decay=0.0, l2=0.01, epochs=1)).fit(data)
    # SGD weight decay on matrices only equals the l2 penalty; set it per group to compare.
    cfg = _cfg(momentum=0.0, weight_decay=0.0, epochs=1)
    trainer = Trainer(b, cfg)

    class WD(Callback):
        def on_after_backward(self, tr):
            for p in tr.model.parameters():
                if p.dim() > 1:
                    p.grad.add_(p.detach(), alpha=0.01)

    trainer.callbacks.append(WD())
    trainer.fit(data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_callbacks_see_every_step_and_can_change_loss():
    data = _data(64)
    seen = []

    class Count(Callback):
        def on_step_end(self, tr):
            seen.append(tr.global_step)

        def on_loss(self, tr, batch, outputs, loss):
            return loss * 0.0  # no gradient signal: weights stay put without weight decay

    model = _model()
    before = [p.clone() for p in model.parameters()]
    Trainer(model, _cfg(epochs=2, weight_decay=0.0), callbacks=[Count()]).fit(data)
    assert seen == list(range(1, 5))
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)


def test_grad_clip_bounds_update():
    data = _data(32)
    model = _model()
    before = [p.clone() for p in model.parameters()]
    Trainer(model, _cfg(epochs=1, batch_size=32, momentum=0.0, weight_decay=0.0, lr=1.0, grad_clip=1e-3)).fit(
        data
    )
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before)))
    assert float(step.detach()) <= 1e-3 + 1e-6


def test_schedules():
    cfg = TrainConfig(lr=1.0, schedule="step", step_size=2, gamma=0.5, progress=False)
    assert [lr_factor(cfg, s * 10, 10, 100) for s in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    cfg = TrainConfig(schedule="cosine", warmup_steps=10, progress=False)
    assert lr_factor(cfg, 0, 10, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 10, 110) == pytest.approx(0.5)
    assert lr_factor(cfg, 110, 10, 110) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"nesterov": True, "optimizer": "adam"}, "nesterov"),
        ({"monitor": "loss"}, "monitor"),
        ({"momentum": 1.5}, "momentum"),
    ],
)
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kw)
    assert err.value.path == field


def test_cross_validate_folds():
    data = _data(200)
    result = cross_validate(
        _model, data, _cfg(epochs=3), k=4, labels=data.tensors[1].numpy(), evaluate=_accuracy(data)
    )
    assert len(result.folds) == 4
    assert 0.8 < result.mean["val_accuracy"] <= 1.0
