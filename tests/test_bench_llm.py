"""bench/bench_llm.py's core (every row built, sized, scored, timed; the targets computed) on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from slimkit.data.lm import TokenWindows
from slimkit.recipes.lm_measure import prompt_rows
from tests.llm_helpers import bench_script, tiny_lm

ROWS = ["bf16", "int8", "rtn", "gptq", "sq", "rtn_g64_head", "gptq_g64_head8"]


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_llm") as module:
        yield module


@pytest.fixture(scope="module")
def result(bench):
    torch.manual_seed(0)
    model = tiny_lm("llama")  # hidden 64, MLP 128, 2 blocks, tied embeddings
    ids = torch.randint(0, 320, (400,))
    test = TokenWindows(ids[:96], 16)
    calib = [{"input_ids": ids[i : i + 16][None]} for i in range(100, 400, 16)][:4]
    args = bench.parse_args(
        ["--rows", *ROWS, "--seq-len", "16", "--prompt-tokens", "8", "--new-tokens", "4"]
        + ["--compile", "gptq_g64_head8"]  # one compiled row: the same model decoded by CompiledDecoding
    )
    args.repeats = 1
    out = bench.run_bench(model, test, calib, prompt_rows(ids, 8, 8), args)
    out["targets"] = bench.targets(out["rows"])
    out["setup"] = {"header": bench.header(args, test, calib, "load before", "load after")}
    return out


def test_every_row_is_scored_sized_and_timed(result):
    rows = result["rows"]
    assert list(rows) == ["fp32", *ROWS, "gptq_g64_head8+compile"]
    fp32 = rows["fp32"]
    assert fp32["delta_pct"] == 0.0 and fp32["decode_speedup"] == 1.0
    assert fp32["tokens"] == 6 * 15 and fp32["seq_len"] == 16  # 6 windows, 15 predicted tokens each
    for key, r in rows.items():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, key
        assert r["decode_b1"] > 0 and r["decode_b8"] > 0 and r["prefill_b1"] > 0, key
        assert r["file_bytes"] > 0, key
    # 7 Linear layers per block x 2 blocks + lm_head. g128 fits only the 128-wide down projections;
    # lm_head stays float except in the row that quantizes it.
    assert {k: rows[k]["layers"] for k in rows} == {
        "fp32": "0/15",
        "int8": "14/15",
        "rtn": "2/15",
        "gptq": "2/15",
        "sq": "14/15",
        "rtn_g64_head": "15/15",
        "gptq_g64_head8": "15/15",
        "bf16": "15/15 bf16",
        "gptq_g64_head8+compile": "15/15",
    }
    compiled, eager = rows["gptq_g64_head8+compile"], rows["gptq_g64_head8"]
    assert compiled["perplexity"] == eager["perplexity"] and compiled["file_bytes"] == eager["file_bytes"]
    assert compiled["label"] == "GPTQ g64 + lm_head int8 + compile" and "compile s: b1 " in compiled["note"]
    assert rows["rtn_g64_head"]["file_bytes"] < rows["int8"]["file_bytes"] < rows["fp32"]["file_bytes"]


def test_calibration_peak_counts_the_model_copy(result):
    rows = result["rows"]
    assert "calib_peak_bytes" not in rows["fp32"]
    for key in ROWS:
        assert rows[key]["calib_s"] >= 0 and rows[key]["peak_ratio"] >= 0, key


def test_targets_are_computed_from_the_rows(result, bench):
    rows = result["rows"]
    got = {what: (measured, met) for what, measured, met in result["targets"]}
    d = rows["int8"]["delta_pct"]
    assert got["slimkit int8 WO within +1% ppl of fp32"] == (f"{d:+.2f}%", d <= 1.0)
    share = bench.loss_share(rows, "gptq", "rtn")
    if share is not None:  # rtn lost perplexity: gptq's share of that loss is judged against 1/2
        assert got["gptq loses <= 1/2 of rtn's ppl loss"][1] == (share <= 0.5)
    assert got["sq calibration peak <= 1.5x fp32 model"][1] == (rows["sq"]["peak_ratio"] <= 1.5)
    assert "rtn decode b1 >= 3x fp32 eager" in got  # no torchao row here: nothing to be ahead of
    speedup = rows["gptq_g64_head8+compile"]["decode_speedup"]
    assert got["gptq_g64_head8+compile decode b1 >= 3x fp32 eager"][1] == (speedup >= 3.0)


def test_quick_shortens_everything(bench):
    args = bench.parse_args(["--quick"])
    assert (args.eval_windows, args.calib_samples, args.prompt_tokens, args.new_tokens, args.repeats) == (
        2,
        2,
        32,
        8,
        1,
    )
    assert args.rows == list(bench.ROWS) and args.threads == 2 and args.seq_len == 1024


def test_the_report_prints_every_row_and_target(result, bench, capsys):
    bench.print_report(result)
    text = capsys.readouterr().out
    assert "seq_len 16, 90 tokens scored in 6 windows" in text and "4 samples x 16 tokens" in text
    for r in result["rows"].values():
        assert r["label"] in text and r["layers"] in text
    assert text.count(" -> met") + text.count(" -> NOT met") == len(result["targets"])
