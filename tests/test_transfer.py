"""Transfer learning: heads, freezing, gradual unfreezing, discriminative rates, LoRA, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.models.hf import SentenceEncoder
from slimkit.tasks import build_task
from slimkit.train import Callback, TrainConfig, Trainer
from slimkit.transfer import FinetuneConfig, HeadConfig, LoraSpec, add_lora_, finetune, merge_lora_
from slimkit.transfer.heads import TaskModel, head_parameters, with_head
from slimkit.transfer.strategies import GradualUnfreezing, discriminative_groups, layer_groups
from tests.transfer_helpers import same, snapshot, tiny_bert, tokenizer, toy_bundle


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture
def encoder(tok):
    return SentenceEncoder(tiny_bert(tok.vocab_size)).eval()


@pytest.fixture(scope="module")
def data():
    return toy_bundle(64)


def _cfg(strategy: str, epochs: int = 3, **kwargs) -> FinetuneConfig:
    train = TrainConfig(epochs=epochs, batch_size=16, lr=2e-3, progress=False, seed=1)
    return FinetuneConfig(strategy=strategy, train=train, max_length=16, **kwargs)


def _trainer(model, task, cfg, **kwargs) -> Trainer:
    return Trainer(
        model,
        cfg,
        forward=task.forward,
        loss_fn=task.loss_fn,
        collate_fn=task.collate_fn,
        task=task.task,
        **kwargs,
    )


def test_linear_probe_trains_only_the_head_and_leaves_the_input_model(encoder, data, tok):
    before = copy.deepcopy(encoder.state_dict())
    result = finetune(encoder, data, _cfg("linear_probe"), tok)
    model = result.model
    assert isinstance(model, TaskModel)
    # the frozen encoder is bit-identical to the pretrained one; the head moved
    for name, value in model.backbone.encoder.state_dict().items():
        assert torch.equal(value, before[f"encoder.{name}"]), name
    head = sum(p.numel() for p in head_parameters(model))
    assert result.trainable_params == head == 32 * 2 + 2
    assert result.total_params == head + sum(v.numel() for v in before.values())
    # finetune works on a copy: the given model is unchanged and keeps its flags
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert all(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags handed back after training


def _fingerprint(model: nn.Module) -> tuple:
    """Everything a non-``_`` function must leave alone: weights, dtypes, grad flags, train/eval modes."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


def assert_untouched(model: nn.Module, before: tuple) -> None:
    state, params, modes = _fingerprint(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(v, before[0][k]) and v.dtype == before[0][k].dtype for k, v in state.items())
    assert params == before[1]
    assert modes == before[2]


@pytest.mark.parametrize("strategy", ["full", "lora", "gradual"])
def test_finetune_leaves_the_given_model_bit_identical(encoder, data, tok, strategy):
    # Not an in-place verb (no trailing _): the model passed in keeps weights, flags and every module's mode.
    encoder.train()
    next(iter(encoder.children())).eval()  # a mixed train/eval state must survive too
    before = _fingerprint(encoder)
    extra = {"lora": {"lora": LoraSpec(r=2)}, "gradual": {"unfreeze_every": 1, "unfreeze_unit": "step"}}.get(
        strategy, {}
    )
    result = finetune(encoder, data, _cfg(strategy, epochs=2, **extra), tok)
    assert result.model is not encoder
    assert_untouched(encoder, before)


def test_full_finetuning_learns_the_toy_task(encoder, data, tok):
    result = finetune(encoder, data, _cfg("full", epochs=4), tok)
    task = build_task(data, tok, max_length=16)
    assert task.evaluate(result.model, data.test)["accuracy"] >= 0.9
    assert result.trainable_params == result.total_params
    assert result.model.training is False


def test_gradual_unfreezing_keeps_frozen_groups_unchanged(encoder, data, tok):
    model = with_head(copy.deepcopy(encoder), HeadConfig(), data)
    groups = layer_groups(model.base_model)
    assert len(groups) == 3  # embeddings, block 0, block 1 (+ pooler)
    task = build_task(data, tok, max_length=16)
    before = [snapshot(g) for g in groups]
    head_before = snapshot(head_parameters(model))
    callback = GradualUnfreezing(groups, every=2, unit="step")
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, max_steps=4, progress=False)
    trainer = _trainer(
        model, task, cfg, callbacks=[callback], param_groups=lambda m: discriminative_groups(m, 1.0)
    )
    trainer.fit(data.train)
    # steps 0-1: head only; steps 2-3: head and the top group
    assert callback.unfrozen == 2  # stage after the 4th step: the next group is on for step 4
    assert same(before[0], groups[0]) and same(before[1], groups[1])
    assert not same(before[2], groups[2])
    assert not same(head_before, head_parameters(model))


def test_discriminative_learning_rates_decay_layer_by_layer(encoder, data, tok):
    model = with_head(copy.deepcopy(encoder), HeadConfig(), data)
    task = build_task(data, tok, max_length=16)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, max_steps=1, progress=False)
    trainer = _trainer(model, task, cfg, param_groups=lambda m: discriminative_groups(m, 0.5, head_scale=2.0))
    trainer.fit(data.train)
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == pytest.approx([0.02, 0.01, 0.005, 0.0025])
    # every parameter is in exactly one group
    ids = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_lora_merge_matches_the_unmerged_adapter(encoder, data, tok):
    model = with_head(copy.deepcopy(encoder), HeadConfig(), data)
    plain_keys = set(model.state_dict())
    targets = add_lora_(model, LoraSpec(r=4, target_modules=["*.query", "*attention.output.dense"]))
    assert len(targets) == 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            nn.init.normal_(p, std=0.5)
    batch = build_task(data, tok, max_length=16).example_batch(data.test, 8)
    model.eval()
    with torch.no_grad():
        base_off = model.backbone.encoder.embeddings.word_embeddings.weight.clone()
        adapted = model(**batch)
        assert merge_lora_(model) == 4
        merged = model(**batch)
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert (adapted - merged).abs().max() < 1e-5 and adapted.abs().max() > 1e-3
    assert set(model.state_dict()) == plain_keys  # a plain model again
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("query"))
    assert torch.equal(model.backbone.encoder.embeddings.word_embeddings.weight, base_off)


def test_lora_finetune_counts_and_merges(encoder, data, tok):
    result = finetune(encoder, data, _cfg("lora", lora=LoraSpec(r=2)), tok)
    # r=2 adapters on query and value of 2 layers: (32*2 + 2*32) * 4, plus the head's 66
    assert result.notes["lora_params"] == 4 * (32 * 2 + 2 * 32)
    assert result.notes["lora_merged_layers"] == 4
    assert not [n for n, _ in result.model.named_parameters() if "lora_" in n]  # merged: none left
    assert result.trainable_params == 4 * (32 * 2 + 2 * 32) + 66
    assert result.total_params == sum(p.numel() for p in encoder.parameters()) + 66


@pytest.mark.parametrize(
    "cfg,field",
    [
        (dict(head=HeadConfig(num_labels=3)), "head.num_labels"),
        (dict(strategy="lora", lora=LoraSpec(target_modules=["*.query", "*.nothing"])), "target_modules[1]"),
        (dict(strategy="gradual", unfreeze_every=1, unfreeze_unit="step"), "unfreeze_every"),
        (dict(strategy="discriminative", layers="no.such.*"), "layers"),
    ],
)
def test_bad_input_fails_before_training_naming_the_field(encoder, data, tok, cfg, field):
    before = copy.deepcopy(encoder.state_dict())
    strategy = cfg.pop("strategy", "full")
    calls = []
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        finetune(encoder, data, _cfg(strategy, epochs=1, **cfg), tok, callbacks=[_Spy(calls)])
    assert calls == []  # no training step ran
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


class _Spy(Callback):
    def __init__(self, calls: list):
        self.calls = calls

    def on_train_begin(self, trainer) -> None:
        self.calls.append("begin")


def test_unfreezing_longer_than_training_is_a_config_error():
    with pytest.raises(ConfigError, match="unfreeze_every"):
        FinetuneConfig(strategy="gradual", train=TrainConfig(epochs=2), unfreeze_every=2)


def test_existing_head_is_checked_and_kept(tok, data):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    hf = BertForSequenceClassification(config).eval()
    with pytest.raises(ConfigError, match="head.num_labels: the model's head has 3 outputs"):
        with_head(hf, HeadConfig(), data)
    replaced = with_head(hf, HeadConfig(pooling="cls"), data, reset=True)
    assert isinstance(replaced, TaskModel) and replaced.head.num_outputs == 2
    assert replaced.base_model is hf.bert


def test_finetune_starts_from_a_slimkit_trained_task_model(encoder, data, tok, tmp_path):
    from slimkit.utils.io import save_weights

    trained = finetune(encoder, data, _cfg("full", epochs=1), tok).model
    path = tmp_path / "model.safetensors"
    save_weights(trained, path)
    probe = finetune(encoder, data, _cfg("linear_probe", epochs=1, weights=str(path)), tok).model
    # the frozen encoder is the trained one, not the pretrained one
    for (name, a), b in zip(probe.backbone.state_dict().items(), trained.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    three = toy_bundle(48, classes=3)
    with pytest.raises(ConfigError, match="weights: .* does not fit the model"):
        finetune(encoder, three, _cfg("full", epochs=1, weights=str(path)), tok)
    with pytest.raises(ConfigError, match="weights: file not found"):
        _cfg("full", weights=str(tmp_path / "missing.safetensors"))


def test_regression_head_with_hidden_layer(encoder, tok):
    data = toy_bundle(64, score=True)
    cfg = _cfg("full", epochs=4, head=HeadConfig(hidden=16))
    result = finetune(encoder, data, cfg, tok)
    assert result.model.head.num_outputs == 1
    assert result.model.head.net[1].out_features == 16
    metrics = build_task(data, tok, max_length=16).evaluate(result.model, data.test)
    assert metrics["spearman"] >= 0.6  # the score is mostly its two-level class (max ~0.87)
    assert result.train.best_epoch is not None  # validated on val "loss" (the MSE for regression)
