"""bench/bench_llm_distill.py's phases (prune depth or width, train in pieces, eval, quant) on a tiny Llama,
and bench_llm_prune.py's report rows built from the state folders they leave."""

from __future__ import annotations

import json
import math

import pytest
import transformers

from tests.llm_helpers import bench_script, text_lines, tiny_lm, tiny_tokenizer

SMALL = [
    "--eval-seq-len", "16", "--eval-windows", "4", "--calib", "4", "--seq-len", "16", "--batch", "2",
    "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--no-compile-decode", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def benches():
    with bench_script("bench_llm_distill") as distill, bench_script("bench_llm_prune") as prune:
        yield distill, prune


@pytest.fixture()
def data(tmp_path, benches, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_text(text_lines(400))
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text_lines(300))
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(benches[0], "dense_model", lambda: (tiny_lm("llama").eval(), tokenizer))
    return tmp_path


def _run(bench, phase: str, state, data, *extra: str) -> None:
    args = bench.parse_args([phase, "--state", str(state), "--data", str(data), *SMALL, *extra])
    args.state.mkdir(parents=True, exist_ok=True)
    {"prune": bench.phase_prune, "train": bench.phase_train, "eval": bench.phase_eval}.get(
        phase, bench.phase_quant
    )(args)


def test_depth_state_runs_every_phase_and_reports_its_rows(benches, data, tmp_path, capsys):
    distill, prune = benches
    state = tmp_path / "depth"
    _run(distill, "prune", state, data, "--drop", "1", "--importance", "perplexity")
    info = json.loads((state / "prune.json").read_text())
    assert len(info["dropped"]) == 1 and info["params_pruned"] < info["params_dense"]
    assert transformers.AutoConfig.from_pretrained(state / "student").num_hidden_layers == 1
    for _ in range(2):  # two pieces of one step each: the schedule and the step count carry over
        _run(distill, "train", state, data, "--steps", "1", "--total-steps", "4", "--warmup", "1")
    train = json.loads((state / "train.json").read_text())
    assert train["steps"] == 2 and len(train["pieces"]) == 2
    _run(distill, "eval", state, data, "--decode")
    _run(distill, "quant", state, data)
    quant = json.loads((state / "quant.json").read_text())
    assert set(quant["decode"]) == {"dense", "student", "quantized"} and quant["file_bytes"] > 0
    rows = prune.state_rows(state)
    assert list(rows) == ["depth_pruned", "depth_recovered", "depth_quantized", "depth_quantized+compile"]
    assert rows["depth_pruned"]["perplexity"] == info["pruned_ppl"]
    assert rows["depth_recovered"]["ratio"] == pytest.approx(
        rows["depth_recovered"]["perplexity"] / info["dense_ppl"]
    )
    assert rows["depth_recovered"]["speedup_b1"] > 0 and rows["depth_recovered"]["recovery_min"] > 0
    assert math.isfinite(rows["depth_quantized"]["perplexity"]) and rows["depth_quantized"]["speedup_b1"] > 0
    assert "decode_b1" not in rows["depth_quantized+compile"]  # compiled decoding was turned off
    prune.print_table({"rows": {}, "runs": []}, [state])
    out = capsys.readouterr().out
    assert "1 blocks dropped" in out and "22 blocks after <= 60 min recovery" in out
    assert "depth_quantized: decode b1" in out


def test_width_state_removes_a_key_value_group_and_a_quarter_of_the_ffn(benches, data, tmp_path):
    distill, prune = benches
    state = tmp_path / "width"
    _run(distill, "prune", state, data, "--mode", "width", "--kv-ratio", "0.5")
    info = json.loads((state / "prune.json").read_text())
    cfg = transformers.AutoConfig.from_pretrained(state / "student")
    dense = tiny_lm("llama").config
    assert cfg.intermediate_size == info["intermediate_size"] == dense.intermediate_size * 3 // 4
    assert cfg.num_key_value_heads == dense.num_key_value_heads // 2
    assert (
        cfg.num_attention_heads == dense.num_attention_heads // 2
    )  # the removed group's query heads went too
    assert list(prune.state_rows(state)) == ["width_pruned"]
