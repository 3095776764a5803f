"""bench/bench_llm_prune.py's core (every row pruned, sized, scored; decode timed; runs merged) on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimkit.data.lm import TokenWindows
from slimkit.recipes.lm_measure import prompt_rows
from tests.llm_helpers import bench_script, tiny_lm


@pytest.fixture(scope="module")
def bench():
    with bench_script("bench_llm_prune") as module:
        yield module


def test_rows_are_pruned_scored_and_merged(bench, tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_lm("llama")  # hidden 64, MLP 128, 2 blocks, tied embeddings
    ids = torch.randint(0, 320, (400,))
    test = TokenWindows(ids[:96], 16)
    calib = [{"input_ids": ids[i : i + 16][None]} for i in range(100, 400, 16)][:4]
    keys = list(bench.PRUNE_ROWS)
    args = bench.parse_args(["--rows", *keys, "--generation", "--seq-len", "16", "--new-tokens", "4"])
    args.repeats, args.prompt_tokens = 1, 8
    rows = bench.run_rows(keys, model, test, calib, prompt_rows(ids, 8, 8), args)
    assert list(rows) == ["dense", *keys]
    assert rows["dense"]["ratio"] == 1.0
    for key in keys:
        r = rows[key]
        assert r["sparsity"] == 0.5 and r["layers"] == 14, key  # 7 Linear per block; the tied lm_head kept
        # a random model predicts about as badly pruned as dense: the ratio only has to be its own
        assert (
            math.isfinite(r["perplexity"])
            and r["ratio"] == r["perplexity"] / rows["dense"]["perplexity"] != 1
        )

        assert r["file_bytes"] < 0.9 * rows["dense"]["file_bytes"], key
    assert rows["dense"]["decode_b1"] > 0 and rows[keys[0]]["decode_b8"] > 0  # timed: dense and the first row
    assert "decode_b1" not in rows[keys[1]]
    assert all(p.abs().sum() > 0 for p in model.parameters())  # the dense model itself was not pruned
    out = tmp_path / "llm_prune.json"
    for run in (["dense", "mag50"], ["dense", "sgpt24"]):  # two runs' rows land in one table
        merged = bench.merge(out, {"rows": {k: rows[k] for k in run}, "setup": {"header": "h", "rows": run}})
        out.write_text(json.dumps(merged))
    assert list(merged["rows"]) == ["dense", "mag50", "sgpt24"] and len(merged["runs"]) == 2
    bench.print_table(merged)
    assert "SparseGPT 2:4" in capsys.readouterr().out
