"""Transfer learning on the real all-MiniLM-L6-v2 (slow: run with ``pytest -m slow``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.data import load_sst2
from slimkit.models.hf import load_hf
from slimkit.tasks import build_task
from slimkit.train import TrainConfig
from slimkit.transfer import FinetuneConfig, HeadConfig, LoraSpec, add_lora_, finetune, merge_lora_
from slimkit.transfer.heads import with_head as attach
from slimkit.transfer.strategies import layer_groups

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return load_hf("minilm", "embedding")


def test_minilm_layer_groups_and_lora_merge(minilm, data_dir):
    model, tok = minilm
    data = load_sst2(data_dir)
    task_model = attach(copy.deepcopy(model), HeadConfig(), data)
    groups = layer_groups(task_model.base_model)
    assert len(groups) == 7  # embeddings + 6 blocks (the unused pooler joins the top block)
    targets = add_lora_(task_model, LoraSpec(r=8, target_modules=["*.query", "*.value"]))
    assert len(targets) == 12
    for name, p in task_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    batch = build_task(data, tok, max_length=64).example_batch(data.test, 16)
    task_model.eval()
    with torch.no_grad():
        adapted = task_model(**batch)
        merge_lora_(task_model)
        merged = task_model(**batch)
    assert (adapted - merged).abs().max() < 1e-4


def test_minilm_linear_probe_on_sst2_beats_chance(minilm, data_dir):
    model, tok = minilm
    data = load_sst2(data_dir)
    train = TrainConfig(epochs=2, batch_size=32, lr=2e-3, progress=False, monitor="val_accuracy")
    result = finetune(model, data, FinetuneConfig(strategy="linear_probe", train=train, max_length=64), tok)
    accuracy = build_task(data, tok, max_length=64).evaluate(result.model, data.test)["accuracy"]
    assert accuracy >= 0.7
    assert result.trainable_params == 384 * 2 + 2
