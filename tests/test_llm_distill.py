"""Recovery of a pruned causal LM by token-level distillation from the unpruned model.

Losses against hand-written references (values and gradients), the memory the chunked KL keeps for
backward, the top-k teacher, the callback on a tiny Llama, config errors, and the shipped
``smollm2_prune_distill`` recipe's step sequence through the CLI on a tiny Llama.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from slimkit.distill import DistillationCallback, DistillConfig
from slimkit.distill.token_kd import scored_rows, teacher_top_k, token_kd_loss, top_k_kd_loss
from slimkit.errors import ConfigError
from tests.llm_helpers import text_lines, tiny_config, tiny_run_overrides, tiny_tokenizer


def _reference(s, t, labels, temperature):
    """The plain formula: mean over scored positions (labels[t + 1] != -100) of T^2 KL(p_t || q_s)."""
    scored = torch.zeros(labels.shape, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    log_q = F.log_softmax(s[scored].float() / temperature, -1)
    log_p = F.log_softmax(t[scored].float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def _logits(seed=0, shape=(2, 9, 40)):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen)
    t = 2 * torch.randn(shape, generator=gen)
    labels = torch.randint(0, shape[-1], shape[:2], generator=gen)
    labels[0, 4] = labels[1, 7] = -100
    return s, t, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_token_kd_matches_the_formula_and_its_gradient(temperature):
    s, t, labels = _logits()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = token_kd_loss(s1, t, labels, temperature, chunk=5)  # chunks of 5 rows: 14 rows -> 3 chunks
    ref = _reference(s2, t, labels, temperature)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)
    # unscored rows (labels[t + 1] == -100, and every window's last position) get no gradient
    assert (
        s1.grad[0, 3].abs().sum() == 0 and s1.grad[1, 6].abs().sum() == 0 and s1.grad[:, -1].abs().sum() == 0
    )
    assert scored_rows(labels).numel() == 2 * 8 - 2


def test_token_kd_is_zero_for_equal_logits_and_shift_invariant():
    s, _, labels = _logits()
    assert token_kd_loss(s, s.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kd_loss(s, s + 3.0, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kd_loss(s, 2 * s, labels, 2.0).item() > 1e-2


def test_token_kd_keeps_no_new_vocabulary_sized_tensor_for_backward():
    """The plain formula keeps softmaxes and products of the logits' size alive until backward; the
    chunked KL keeps references to the two logit tensors (which exist anyway) and the row indices."""
    s, t, labels = _logits(shape=(2, 64, 500))
    logits_bytes = s.numel() * s.element_size()

    def new_bytes(fn):
        student = s.clone().requires_grad_()
        known = {student.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
        sizes = []

        def pack(x):
            if x.untyped_storage().data_ptr() not in known:
                sizes.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(student, t, labels, 1.0)
        return sum(sizes)

    chunked, plain = new_bytes(token_kd_loss), new_bytes(_reference)
    assert chunked <= 8 * 2 * 64  # int64 row indices only
    assert plain > 1.5 * logits_bytes  # measured 1.9x the logits (a copy of the rows, log_q, p, p*log)


def test_top_k_teacher_with_all_but_one_token_is_the_full_kl():
    s, t, labels = _logits()
    full = token_kd_loss(s, t, labels, 2.0).item()
    values, ids = teacher_top_k(t, 39, 2.0)  # every token but one: the rest bucket holds that one
    assert values.dtype == torch.float16 and ids.dtype == torch.int32 and ids.shape == (2, 9, 39)
    assert top_k_kd_loss(s, values, ids, labels, 2.0, chunk=4).item() == pytest.approx(full, rel=2e-3)
    few_values, few_ids = teacher_top_k(t, 5, 2.0)
    few = top_k_kd_loss(s, few_values, few_ids, labels, 2.0)
    # fewer buckets merge probability mass, and KL never grows when outcomes are merged
    assert 0 < few.item() < full
    assert top_k_kd_loss(t, few_values, few_ids, labels, 2.0).item() == pytest.approx(0.0, abs=2e-3)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: DistillConfig(output_loss="kd", top_k=8), "top_k"),
        (lambda: DistillConfig(output_loss="token_kd", top_k=0), "top_k"),
        (lambda: DistillConfig(output_loss="token_kd", cache="x.safetensors"), "cache"),
    ],
)
def test_bad_token_kd_configs_are_named(make, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        make()


def _lm(layers: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = tiny_config("llama", len(tiny_tokenizer()))
    config.num_hidden_layers = layers
    return transformers.AutoModelForCausalLM.from_config(config)


def _windows(seq_len=32, lines=300):
    from slimkit.data.lm import TokenWindows, encode

    return TokenWindows(encode(tiny_tokenizer(), text_lines(lines)), seq_len)


def _batch(windows, n=4):
    return {k: torch.stack([windows[i][k] for i in range(n)]) for k in ("input_ids", "labels")}


@pytest.fixture(scope="module")
def taught():
    return _pretrained(4)


def _pretrained(layers: int, steps: int = 60):
    """A tiny Llama trained on the numbered lines, so that it has something to teach."""
    from slimkit.tasks import lm_loss, text_forward
    from slimkit.train import TrainConfig, Trainer

    model = _lm(layers)
    cfg = TrainConfig(epochs=20, batch_size=8, lr=3e-3, max_steps=steps, progress=False)
    Trainer(model, cfg, forward=text_forward, loss_fn=lm_loss).fit(_windows())
    return model.eval()


def _perplexity(model, windows):
    from slimkit.metrics.lm import evaluate_perplexity

    return evaluate_perplexity(model, windows, forward=lambda m, b: m(input_ids=b["input_ids"]))["perplexity"]


def test_token_kd_recovers_a_depth_pruned_tiny_llama(taught):
    from slimkit.distill import distill_
    from slimkit.prune import DepthConfig, prune_
    from slimkit.tasks import lm_loss, text_forward
    from slimkit.train import TrainConfig

    teacher = copy.deepcopy(taught)
    windows = _windows()
    student = copy.deepcopy(teacher)
    prune_(student, DepthConfig(blocks=2), calibration=[_batch(windows)], forward=text_forward)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dense, pruned = _perplexity(teacher, windows), _perplexity(student, windows)
    cfg = DistillConfig(output_loss="token_kd", temperature=1.0, alpha=1.0)
    train = TrainConfig(epochs=2, batch_size=8, lr=2e-3, progress=False)
    result = distill_(
        student, teacher, windows, cfg, train, task="language_modeling", loss_fn=lm_loss, forward=text_forward
    )
    recovered = _perplexity(student, windows)
    print(dense, pruned, recovered)
    assert pruned > 1.1 * dense, (dense, pruned)  # dropping half the blocks hurts
    assert recovered < pruned and recovered - dense < 0.5 * (pruned - dense), (dense, pruned, recovered)
    kd = [h["distill_output"] for h in result.train.history]
    assert kd[-1] < 0.5 * kd[0], kd
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched


def test_hidden_pairs_follow_the_kept_blocks_and_top_k_is_cached(tmp_path):
    from slimkit.distill.hooks import default_layer_map
    from slimkit.prune import DepthConfig, prune_
    from slimkit.recipes.steps.distill import kept_block_map
    from slimkit.tasks import lm_loss, text_forward
    from slimkit.train import TrainConfig, Trainer

    teacher = _lm(4).eval()
    student = copy.deepcopy(teacher)
    windows = torch.utils.data.Subset(_windows(), range(16))
    summary = prune_(student, DepthConfig(blocks=2), calibration=[_batch(windows)], forward=text_forward)
    kept = [i for i in range(4) if i not in summary.details["dropped"]]
    layer_map = kept_block_map(student)
    assert layer_map == {f"model.layers.{i}": f"model.layers.{j}" for i, j in enumerate(kept)}
    assert layer_map != default_layer_map(student, teacher)  # the uniform map pairs blocks 1 and 3
    cfg = DistillConfig(
        output_loss="token_kd", top_k=16, hidden_weight=1.0, layer_map=layer_map, cache=str(tmp_path / "c")
    )
    cb = DistillationCallback(teacher, cfg, forward=text_forward)
    train = TrainConfig(epochs=2, batch_size=8, lr=1e-9, progress=False)  # weights (nearly) fixed
    result = Trainer(student, train, callbacks=[cb], forward=text_forward, loss_fn=lm_loss).fit(windows)
    assert cb.cache.misses == 2 and cb.cache.hits == 2  # epoch 2 reads the teacher's top-16 back
    first, second = result.history
    for term in ("distill_output", "distill_hidden"):  # from the cache as from the live teacher
        assert first[term] > 1e-6 and second[term] == pytest.approx(first[term], rel=1e-4), term


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_smollm2_prune_distill_recipe_on_a_tiny_llama(tmp_path, capsys, taught):
    from slimkit.cli import main

    folder = _save(taught, tmp_path / "tiny-llama")
    corpus, more = tmp_path / "corpus.txt", tmp_path / "more.txt"
    corpus.write_text(text_lines(300))
    more.write_text(text_lines(200)[::-1])
    overrides = [
        *tiny_run_overrides(folder, corpus, tmp_path / "run"),
        "data.test_fraction=0.2",
        "steps.1.depth.blocks=2",
        "steps.1.depth.calibration_batches=4",
        "steps.1.calibration_samples=4",
        "steps.2.seq_len=16",
        f"steps.2.extra_data=[{{name: text, path: {more}}}]",
        "steps.2.train.max_steps=60",
        "steps.2.train.warmup_steps=5",
        "steps.2.train.batch_size=8",
        "steps.2.train.lr=0.003",
        "steps.2.train.epochs=10",
        "steps.3.calibration_samples=16",
    ]
    assert main(["run", "recipes/smollm2_prune_distill.yaml", "-q", *overrides]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {row["step"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", "depth22", "depth22_recovered", "depth22_int4_gptq_g64"]
    ppl = {k: r["metrics"]["perplexity"] for k, r in rows.items()}
    for row in rows.values():
        assert row["metrics"]["seq_len"] == 32 and row["extra"]["generation"]["decode tok/s b1"] > 0
    assert ppl["depth22"] > ppl["fp32"] and ppl["depth22_recovered"] < ppl["depth22"], ppl
    assert ppl["depth22_int4_gptq_g64"] < 1.5 * ppl["depth22_recovered"], ppl
    notes = rows["depth22_recovered"]["extra"]
    assert notes["output_loss"] == "token_kd" and notes["teacher_logits"] == "live (full vocabulary)"
    assert notes["seq_len"] == 16 and notes["steps"] == 60
    assert rows["depth22"]["params"] < rows["fp32"]["params"]
    # the final model (2 of 4 blocks, int4) opens from the run folder as `slimkit generate` opens it
    from slimkit.data.lm import load_text, tokenize_bundle
    from slimkit.recipes.generate import load_run_model

    model, tokenizer = load_run_model(tmp_path / "run")
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    test = tokenize_bundle(load_text(corpus, val_fraction=0, test_fraction=0.2, seq_len=32), tokenizer).test
    assert _perplexity(model, test) == pytest.approx(ppl["depth22_int4_gptq_g64"], rel=1e-4)


@pytest.mark.parametrize(
    ("distill", "expected"),
    [
        ({"student": "current", "teacher": "first"}, "steps[1].teacher: must be 'self', 'initial' or"),
        (
            {"student": "current", "teacher": "initial", "seq_len": 1},
            "steps[1].seq_len: must be an integer >= 2",
        ),
        (
            {"student": "current", "teacher": "initial", "autocast": "fp8"},
            "steps[1].autocast: must be one of",
        ),
        (
            {"student": "current", "teacher": "initial", "distill": {"top_k": 0}},
            "steps[1].distill.top_k: must be a positive integer",
        ),
        (
            {"student": {"layers_every": 2}, "distill": {"output_loss": "kd", "top_k": 8}},
            "steps[1].distill.top_k: applies to output_loss token_kd only",
        ),
        (
            {
                "student": "current",
                "teacher": "initial",
                "distill": {"output_loss": "token_kd", "cache": True},
            },
            "steps[1].distill.cache: a language model's teacher logits",
        ),
        (
            {"student": "current", "teacher": "initial", "extra_data": [{"name": "wikitext2"}]},
            "steps[1].extra_data[0].path: is required for wikitext2",
        ),
    ],
)
def test_bad_lm_distill_steps_are_named(tmp_path, capsys, distill, expected):
    from slimkit.cli import main
    from tests.test_distill_recipe import _recipe

    assert main(["validate", str(_recipe(tmp_path, distill))]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


def test_language_model_options_on_other_data_fail_before_training(tmp_path, capsys):
    from slimkit.cli import main
    from tests.test_distill_recipe import _recipe

    path = _recipe(tmp_path, {"student": "current", "teacher": "initial", "seq_len": 16})
    assert main(["run", str(path), "--quiet"]) == 2
    assert "steps[1].seq_len: applies to language-modelling data only" in capsys.readouterr().err
