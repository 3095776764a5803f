"""Structured pruning of decoder LLMs: GQA-aware attention, SwiGLU FFN, depth (whole blocks).

Tiny Llama (tied embeddings) and Qwen2 (untied, per-layer ``layer_types``), 4 query heads sharing 2
key/value heads, built from configs offline.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.metrics.generation import greedy_generate
from slimkit.models.hf_folder import folder_form_problem, save_hf_folder
from slimkit.prune import DepthConfig, StructuredConfig, load_pruned, prune_, save_pruned
from slimkit.prune.depth import drop_blocks_
from slimkit.recipes.steps.saving import load_model_folder

transformers = pytest.importorskip("transformers")

from tests.llm_helpers import save_tiny_lm, text_lines, tiny_config  # noqa: E402

VOCAB, HEAD_DIM = 320, 16
GEN = torch.Generator().manual_seed(3)
IDS = {"input_ids": torch.randint(0, VOCAB, (2, 20), generator=GEN)}
CALIB = [{"input_ids": torch.randint(0, VOCAB, (2, 24), generator=GEN)} for _ in range(3)]


def _lm(kind: str = "llama", layers: int = 2, seed: int = 0, **overrides):
    config = tiny_config(kind, VOCAB)
    config.num_hidden_layers = layers
    if kind == "qwen2":
        config.layer_types = ["full_attention"] * layers
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch or IDS)).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _kept_heads(original, pruned, layer: int) -> list[int]:
    """Query heads of ``original`` whose q_proj rows are still in ``pruned`` (in order)."""
    old = original.model.layers[layer].self_attn.q_proj.weight.view(-1, HEAD_DIM, 64)
    new = pruned.model.layers[layer].self_attn.q_proj.weight.view(-1, HEAD_DIM, 64)
    return [next(i for i in range(old.shape[0]) if torch.equal(old[i], h)) for h in new]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["groups", "heads"])
def test_gqa_pruning_equals_zeroing_the_removed_heads_first(kind, mode):
    model = _lm(kind)
    original = copy.deepcopy(model)
    cfg = StructuredConfig(ratio=0.25, head_ratio=0.5, gqa=mode, prune_channels=False, importance="l2")
    summary = prune_(model, cfg, example_inputs=IDS)
    zeroed = copy.deepcopy(original)
    for layer in range(2):
        kept = _kept_heads(original, model, layer)
        if mode == "groups":  # one whole group (2 query heads sharing one KV head) left
            assert len(kept) == 2 and kept[0] // 2 == kept[1] // 2
        else:  # one query head left in each of the 2 groups
            assert len(kept) == 2 and [h // 2 for h in kept] == [0, 1]
        o_proj = zeroed.model.layers[layer].self_attn.o_proj.weight
        with torch.no_grad():
            for head in set(range(4)) - set(kept):
                o_proj[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
        att = model.model.layers[layer].self_attn
        assert att.head_dim == HEAD_DIM and att.num_key_value_groups == (2 if mode == "groups" else 1)
        assert att.k_proj.out_features == (1 if mode == "groups" else 2) * HEAD_DIM
    torch.testing.assert_close(_logits(model), _logits(zeroed), rtol=1e-5, atol=1e-5)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (
        (2, 1) if mode == "groups" else (2, 2)
    )
    assert summary.config["num_attention_heads"] == 2 and not summary.non_uniform
    assert [g["kind"] for g in summary.groups] == [f"{'kv_group' if mode == 'groups' else 'q_head'}"] * 2


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_swiglu_ffn_prunes_gate_and_up_with_down_inputs(kind):
    model = _lm(kind)
    summary = prune_(model, StructuredConfig(ratio=0.25, importance="l2"), example_inputs=IDS)
    mlp = model.model.layers[0].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (96, 96, 96)
    assert model.config.intermediate_size == 96 and summary.config == {"intermediate_size": 96}
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * HEAD_DIM  # no gqa: attention kept
    assert _logits(model).shape == (2, 20, VOCAB)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("how", ["gqa_groups", "gqa_heads", "depth"])
def test_a_pruned_model_generates_the_same_with_and_without_kv_cache(kind, how):
    model = _lm(kind, layers=3)
    if how == "depth":
        prune_(model, DepthConfig(blocks=1), calibration=CALIB)
        assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    else:
        mode = how.removeprefix("gqa_")
        prune_(model, StructuredConfig(ratio=0.25, head_ratio=0.5, gqa=mode), example_inputs=IDS)
    prompt = IDS["input_ids"][:, :6]
    cached = greedy_generate(model, prompt, 10)
    assert torch.equal(cached, greedy_generate(model, prompt, 10, use_cache=False))
    assert cached.shape == (2, 16)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_depth_pruned_model_reopens_with_from_pretrained(tmp_path, kind):
    model = _lm(kind, layers=4)
    summary = prune_(model, DepthConfig(ratio=0.5, importance="angular"), calibration=CALIB)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert len(summary.details["dropped"]) == 2 and summary.config == {"num_hidden_layers": 2}
    if kind == "qwen2":
        assert model.config.layer_types == ["full_attention"] * 2
    assert folder_form_problem(model) is None
    save_hf_folder(model, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    opened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(_logits(opened), _logits(model))
    assert (opened.lm_head.weight is opened.get_input_embeddings().weight) is (kind == "llama")
    # what --resume and `slimkit generate` do: the folder into the model as loaded before pruning
    assert torch.equal(
        _logits(load_model_folder(_lm(kind, layers=4, seed=9), tmp_path / "model")), _logits(model)
    )


def test_angular_importance_is_one_minus_cosine_across_each_block():
    model = _lm(layers=4)
    summary = prune_(
        copy.deepcopy(model), DepthConfig(blocks=1, calibration_batches=1), calibration=CALIB[:1]
    )
    with torch.no_grad():
        hidden = model(**CALIB[0], output_hidden_states=True).hidden_states  # the last has the final norm
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert summary.details["scores"][i] == pytest.approx(float(1 - cos.mean()), abs=1e-5)
    scores = summary.details["scores"]
    assert summary.details["dropped"] == [min(range(4), key=scores.__getitem__)]


def test_perplexity_importance_is_the_loss_increase_without_the_block():
    from slimkit.metrics.lm import next_token_loss

    model = _lm(layers=3)
    summary = prune_(copy.deepcopy(model), DepthConfig(blocks=1, importance="perplexity"), calibration=CALIB)

    def loss(m):
        return sum(float(next_token_loss(_logits(m, b), b["input_ids"])) for b in CALIB) / len(CALIB)

    base = loss(model)
    for i in range(3):
        without = copy.deepcopy(model)
        drop_blocks_(without, "model.layers", [j for j in range(3) if j != i])
        assert summary.details["scores"][i] == pytest.approx(loss(without) - base, abs=1e-5)


def test_uniform_width_pruning_saves_as_a_hugging_face_folder(tmp_path):
    model = _lm("llama")
    cfg = StructuredConfig(ratio=0.25, head_ratio=0.5, gqa="groups", importance="activation")
    prune_(model, cfg, calibration=CALIB)
    save_hf_folder(model, tmp_path / "model")
    opened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    c = opened.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (96, 2, 1, 16)
    assert opened.lm_head.weight is opened.get_input_embeddings().weight  # still tied
    assert torch.equal(_logits(opened), _logits(model))


def test_non_uniform_shapes_stay_in_slimkits_format(tmp_path):
    model = _lm("llama", layers=3)
    cfg = StructuredConfig(ratio=0.25, ratios={"model.layers.0.*": 0.5}, head_ratio=0.5, gqa="heads")
    summary = prune_(model, cfg, example_inputs=IDS)
    prune_(model, DepthConfig(blocks=1), calibration=CALIB)
    assert summary.non_uniform == ["intermediate_size"] and model.config.intermediate_size == 128
    assert "intermediate_size" not in summary.config and summary.config["num_attention_heads"] == 2
    assert "not a tensor of a plain LlamaForCausalLM" in folder_form_problem(model)
    save_pruned(model, tmp_path / "pruned.safetensors")
    fresh = load_pruned(_lm("llama", layers=3, seed=5), tmp_path / "pruned.safetensors")
    assert len(fresh.model.layers) == 2 and fresh.model.layers[0].self_attn.num_key_value_groups == 1
    assert torch.equal(_logits(fresh), _logits(model))
    assert torch.equal(
        greedy_generate(fresh, IDS["input_ids"][:, :5], 6), greedy_generate(model, IDS["input_ids"][:, :5], 6)
    )


@pytest.mark.parametrize(
    ("make", "overrides", "field"),
    [
        # 2 key/value groups x 0.25 removes none: the count cannot change and stay a valid GQA
        (lambda: StructuredConfig(head_ratio=0.25, gqa="groups"), {}, "head_ratio"),
        (lambda: StructuredConfig(head_ratio=0.5, gqa="groups"), {"num_key_value_heads": 1}, "gqa"),
        (lambda: StructuredConfig(head_ratio=0.5, gqa="heads"), {"num_key_value_heads": 4}, "gqa"),
        (lambda: DepthConfig(blocks=2), {}, "blocks"),
        (lambda: DepthConfig(blocks=1), {"calibration": None}, "calibration"),
    ],
)
def test_bad_settings_are_refused_naming_the_field_and_leave_the_model(make, overrides, field):
    calibration = overrides.pop("calibration", CALIB)
    model = _lm("llama", **overrides)
    before, layers = _state(model), len(model.model.layers)
    with pytest.raises(ConfigError) as err:
        prune_(model, make(), calibration=calibration)
    assert err.value.path == field
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.model.layers) == layers and model.config.num_key_value_heads == overrides.get(
        "num_key_value_heads", 2
    )


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: StructuredConfig(gqa="rows"), "gqa"),
        (lambda: StructuredConfig(gqa="groups", prune_heads=False), "gqa"),
        (lambda: DepthConfig(ratio=1.0), "ratio"),
        (lambda: DepthConfig(ratio=-0.1), "ratio"),
        (lambda: DepthConfig(blocks=0), "blocks"),
        (lambda: DepthConfig(), "blocks"),
        (lambda: DepthConfig(blocks=1, ratio=0.5), "blocks"),
        (lambda: DepthConfig(blocks=1, importance="cosine"), "importance"),
    ],
)
def test_bad_configs_name_their_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.path == field


def test_depth_and_gqa_prune_steps_through_the_cli(tmp_path):
    from slimkit.cli import main
    from slimkit.recipes.generate import load_run_model

    folder = save_tiny_lm(tmp_path / "tiny-llama", "llama")
    text = tmp_path / "corpus.txt"
    text.write_text(text_lines(300))
    recipe = {
        "name": "llm_prune",
        "model": {"hf": str(folder), "hf_task": "causal_lm"},
        "data": {"name": "text", "path": str(text), "seq_len": 32},
        "steps": [
            {"type": "prune", "name": "width", "calibration_samples": 8,
             "structured": {"ratio": 0.25, "head_ratio": 0.5, "gqa": "groups", "importance": "activation"}},
            {"type": "prune", "name": "depth", "calibration_samples": 8,
             "depth": {"blocks": 1, "importance": "perplexity"}},
        ],
        "measure": {"repeats": 1, "warmup": 0, "generation": {"prompt_tokens": 8, "new_tokens": 4,
                    "batch_sizes": [1], "repeats": 1}},
        "output": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["run", str(path), "-q"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {row["step"]: row for row in report["rows"]}
    assert rows["width"]["extra"]["saved_as"] == rows["depth"]["extra"]["saved_as"] == "hf_folder"
    assert len(rows["depth"]["extra"]["depth"]["scores"]) == 2
    assert rows["depth"]["extra"]["params_after"] < rows["width"]["extra"]["params_after"]
    opened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert opened.config.num_hidden_layers == 1 and opened.config.num_key_value_heads == 1
    model, _ = load_run_model(tmp_path / "run")
    assert len(model.model.layers) == 1 and torch.equal(_logits(model), _logits(opened))
