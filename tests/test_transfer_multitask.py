"""Multi-task learning: shared encoder, per-task heads, loss weightings, task sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.models.hf import SentenceEncoder
from slimkit.tasks import build_task
from slimkit.train import TrainConfig
from slimkit.transfer import MultiTaskConfig, TaskSpec
from slimkit.transfer.multitask import MixedBatches, TaskView, task_probabilities, train_multitask
from slimkit.transfer.weighting import GradNorm, UncertaintyWeighting
from tests.transfer_helpers import tiny_bert, tokenizer, toy_bundle


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def encoder(tok):
    return SentenceEncoder(tiny_bert(tok.vocab_size)).eval()


@pytest.fixture(scope="module")
def tasks():
    return {
        "polarity": toy_bundle(60, classes=2, seed=1, name="polarity"),
        "family": toy_bundle(90, classes=3, seed=2, name="family"),
        "strength": toy_bundle(60, seed=3, score=True, name="strength"),
    }


def _config(weighting: str = "fixed", epochs: int = 4, **kwargs) -> MultiTaskConfig:
    specs = [TaskSpec("polarity"), TaskSpec("family"), TaskSpec("strength", weight=0.5)]
    train = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, progress=False, monitor="val_score")
    return MultiTaskConfig(specs, weighting=weighting, train=train, max_length=16, **kwargs)


@pytest.fixture(scope="module")
def uncertainty_run(encoder, tasks, tok):
    return train_multitask(encoder, tasks, _config("uncertainty", weighting_lr=0.05), tok)


def test_uncertainty_loss_matches_its_formula():
    weighting = UncertaintyWeighting(["a", "b"], ["classification", "regression"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -0.7]))
    la, lb = torch.tensor(1.2), torch.tensor(0.4)
    expected = math.exp(-0.3) * 1.2 + 0.15 + 0.5 * math.exp(0.7) * 0.4 - 0.35
    assert weighting({"a": la, "b": lb}).item() == pytest.approx(expected, rel=1e-6)
    assert weighting({"b": lb}).item() == pytest.approx(0.5 * math.exp(0.7) * 0.4 - 0.35, rel=1e-6)


def test_multitask_model_learns_every_task_and_uncertainty_weights_move(uncertainty_run, encoder):
    result = uncertainty_run
    assert result.metrics["polarity"]["accuracy"] >= 0.9
    assert result.metrics["family"]["accuracy"] >= 0.9
    assert (
        result.metrics["strength"]["spearman"] >= 0.6
    )  # the score is mostly the two-level class (max ~0.87)
    # the learned log-variances left their start (0 => weight 1 for classification, 0.5 for regression)
    assert abs(result.weights["polarity"] - 1.0) > 0.02 and abs(result.weights["strength"] - 0.5) > 0.01
    # the encoder was copied: the given model is unchanged
    assert result.model.backbone.encoder is not encoder.encoder


def test_train_multitask_leaves_the_given_model_bit_identical(tasks, tok):
    encoder = SentenceEncoder(tiny_bert(tok.vocab_size)).train()
    next(iter(encoder.children())).eval()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    modes = {n: m.training for n, m in encoder.named_modules()}
    flags = {n: p.requires_grad for n, p in encoder.named_parameters()}
    result = train_multitask(encoder, tasks, _config(epochs=1), tok)
    assert result.model.backbone.encoder is not encoder.encoder
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    assert {n: m.training for n, m in encoder.named_modules()} == modes
    assert {n: p.requires_grad for n, p in encoder.named_parameters()} == flags


def test_per_task_metrics_equal_those_computed_directly(uncertainty_run, tasks, tok):
    model = uncertainty_run.model
    for name in ("polarity", "family"):
        rows = tasks[name].test.rows
        enc = tok(
            [r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"
        )
        with torch.no_grad():
            logits = model(**enc, task=name)
        labels = torch.tensor([r["label"] for r in rows])
        direct = (logits.argmax(-1) == labels).float().mean().item()
        assert uncertainty_run.metrics[name]["accuracy"] == pytest.approx(direct, abs=1e-9)
    # the default task is the first one, and a view of one task is an ordinary model
    assert model.default_task == "polarity"
    view_acc = build_task(tasks["family"], tok, 16).evaluate(TaskView(model, "family"), tasks["family"].test)
    assert view_acc["accuracy"] == pytest.approx(uncertainty_run.metrics["family"]["accuracy"])


def test_gradnorm_learns_weights_that_sum_to_the_task_count(encoder, tasks, tok):
    result = train_multitask(encoder, tasks, _config("gradnorm", epochs=2, weighting_lr=0.05), tok)
    weights = list(result.weights.values())
    assert sum(weights) == pytest.approx(3.0, rel=1e-5)
    assert max(abs(w - v) for w, v in zip(weights, [1.0, 1.0, 0.5 * 3 / 2.5])) > 0.01


def test_gradnorm_sends_the_weighted_loss_to_the_network_and_the_balance_loss_to_the_weights():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4))
    head = torch.nn.Parameter(torch.randn(4))
    gradnorm = GradNorm(["a", "b"], [1.0, 1.0], alpha=1.0)

    def losses():
        return {"a": (shared * head).sum() ** 2, "b": (3 * shared).sum() ** 2}

    norms = [torch.autograd.grad(v, shared)[0].norm() for v in losses().values()]
    gradnorm(losses(), [shared]).backward()
    expected_head = torch.autograd.grad(losses()["a"], head)[0]
    assert torch.allclose(head.grad, expected_head)  # weights 1 and held constant for the network
    assert gradnorm.weights.grad is not None and gradnorm.weights.grad.abs().sum() > 0
    # at the first step r_t = 1: the target is the mean norm, so the larger-gradient task is pushed down
    big = int(torch.stack(norms).argmax())
    assert gradnorm.weights.grad[big] > 0


def test_task_sampling_proportional_and_temperature():
    p1 = task_probabilities([100, 400], 1.0)
    p2 = task_probabilities([100, 400], 2.0)
    assert p1 == pytest.approx([0.2, 0.8]) and p2 == pytest.approx([1 / 3, 2 / 3])
    batches = MixedBatches([100, 400], p2, batch_size=32, steps=200, seed=5)
    tasks = np.array([t for plan in batches.plans for t, _ in plan])
    assert len(batches) == 200 and all(len(plan) == 32 for plan in batches.plans)
    assert abs((tasks == 0).mean() - 1 / 3) < 0.02
    first = [list(plan) for plan in batches.plans]
    batches.set_epoch(1)
    assert batches.plans != first
    batches.set_epoch(0)
    assert batches.plans == first  # the plan is a function of (seed, epoch)
    # a task's rows are walked through a permutation: the first 100 draws of task 0 cover it exactly
    rows = [i for plan in first for t, i in plan if t == 0][:100]
    assert sorted(rows) == list(range(100))


def test_bad_multitask_input_names_the_field(encoder, tasks, tok):
    with pytest.raises(ConfigError, match=r"tasks\[2\]\.name: 'polarity' is already the name of tasks\[0\]"):
        MultiTaskConfig([TaskSpec("polarity"), TaskSpec("family"), TaskSpec("polarity")])
    bad = MultiTaskConfig([TaskSpec("polarity"), TaskSpec("family", num_labels=5), TaskSpec("strength")])
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.num_labels: the head has 5 outputs but family has 3"):
        train_multitask(encoder, tasks, bad, tok)
    with pytest.raises(ConfigError, match="tasks: data given for"):
        train_multitask(encoder, {"polarity": tasks["polarity"]}, _config(), tok)
