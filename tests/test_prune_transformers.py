"""Structured pruning of Hugging Face BERT: heads and FFN neurons go, the hidden size stays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slimkit.prune import StructuredConfig, analyze, prune_

transformers = pytest.importorskip("transformers")


def _tiny_bert(attn: str):
    cfg = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _ids(batch: int, seq: int) -> dict:
    ids = torch.randint(5, 120, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_heads_and_ffn_pruned_without_exclusions(attn):
    model = _tiny_bert(attn)
    groups = analyze(model, _ids(2, 7))
    prunable = sorted((g.kind, g.name) for g in groups if g.prunable)
    assert [k for k, _ in prunable] == ["channel", "channel", "head", "head"]
    assert all("intermediate.dense" in n or "attention.self" in n for _, n in prunable)
    blocked = {g.name: g.unsafe for g in groups if not g.prunable}
    assert any("model's output" in why for why in blocked["pooler.dense"])
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_ids(2, 7))
    layer = model.encoder.layer[0]
    assert layer.attention.self.query.out_features == 16 and layer.attention.self.num_attention_heads == 2
    assert layer.attention.output.dense.in_features == 16 and layer.attention.output.dense.out_features == 32
    assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    assert model.pooler.dense.weight.shape == (32, 32)
    for batch, seq in [(1, 1), (3, 5), (5, 40)]:
        out = model(**_ids(batch, seq))
        assert out.last_hidden_state.shape == (batch, seq, 32) and out.pooler_output.shape == (batch, 32)


def test_bert_zero_heads_removed_keep_outputs():
    """Heads whose value projection is zero contribute nothing: removing them changes no output."""
    model = _tiny_bert("sdpa")
    with torch.no_grad():
        for layer in model.encoder.layer:
            v = layer.attention.self.value
            v.weight[8:16] = 0  # head 1 of 4 (head size 8)
            v.bias[8:16] = 0
    x = _ids(3, 9)
    before = model(**x).last_hidden_state
    calib = [_ids(4, 9) for _ in range(2)]
    prune_(model, StructuredConfig(ratio=0.0, head_ratio=0.25, importance="activation"), calibration=calib)
    assert model.encoder.layer[1].attention.self.num_attention_heads == 3
    torch.testing.assert_close(model(**x).last_hidden_state, before, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_real_minilm_half_heads_half_ffn():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from slimkit.models.hf import load_hf

    model, tok = load_hf("minilm")
    example = dict(tok(["a sentence", "another, longer sentence"], padding=True, return_tensors="pt"))
    summary = prune_(model, StructuredConfig(ratio=0.5), example_inputs=example)
    assert summary.params_before == 22_713_216 and summary.params_after == 17_396_736
    assert {g["after"] for g in summary.groups} == {6, 768}
    for batch, seq in [(1, 1), (4, 33), (2, 512)]:
        ids = torch.randint(1000, 20000, (batch, seq))
        assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).shape == (batch, 384)
    assert Path(tok.name_or_path).exists()


def test_calibration_statistics_skip_padding_tokens():
    """Stats on a right-padded batch equal those on the same sentences without the padding."""
    from slimkit.prune.importance import make_importance

    model = _tiny_bert("eager")
    ids = torch.randint(5, 120, (2, 6))
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], 1).long()}  # fmt: skip
    plain = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    groups = [g for g in analyze(model, plain) if g.prunable]
    scores = []
    for batch in (padded, plain):
        imp = make_importance("output")
        imp.prepare(model, groups, [batch], None, None)
        scores.append(torch.cat([imp.score(model, g) for g in groups]))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-6)
