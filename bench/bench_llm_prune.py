"""LLM pruning benchmark: SmolLM2-135M dense against 50% and 2:4 magnitude, Wanda and SparseGPT.

Same protocol as ``bench/bench_llm.py`` (whose helpers it imports: data, calibration windows,
forward, generation timing, header): perplexity on the last 20% of WikiText-2 validation
(``--eval-windows`` windows of ``--seq-len`` tokens, never calibrated on), calibration on
``--calib-samples`` windows spread over the first 80%. Every block Linear (7 per block, 210) is
pruned; ``lm_head`` is tied to the embedding table and stays dense (Wanda and SparseGPT skip tied
weights; the magnitude rows exclude it and the embeddings explicitly), as in both papers.

- ``size MB``: ``save_sparse`` (bitmask + non-zero values: the tied embedding table, 28.3M of the
  134.5M parameters, stays dense); dense row ``save_weights``.
- ``decode``: the pruned weights are ordinary dense tensors with zeros, run by the same dense
  kernels, so decode speed is the dense model's (measured on the dense row and one pruned row,
  interleaved; ``bench/bench_sparse_kernels.py`` measures whether any CPU sparse kernel would help).
- ``calib s``: wall time of ``prune_`` (calibration block by block + pruning).

The rows can run a few at a time (each run's rows are merged into ``--out``; the dense row is
re-measured every run, and ``--report`` prints the merged table)::

    .venv/bin/python bench/bench_llm_prune.py --rows mag50 wanda50 sgpt50 --eval-windows 8 --seq-len 512
    .venv/bin/python bench/bench_llm_prune.py --rows wanda24 sgpt24 --generation
    .venv/bin/python bench/bench_llm_prune.py --report
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_llm import header, lm_forward, load_data, measure_generation
from benchlib import log, uptime
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DENSE_ONLY = ["lm_head", "embed_tokens"]  # magnitude: the tied table stays dense, as Wanda/SparseGPT keep it

#: key -> (label, method, config keyword arguments); method: magnitude | wanda | sparsegpt
PRUNE_ROWS: dict[str, tuple[str, str, dict]] = {
    "mag50": ("magnitude 50%", "magnitude", {"sparsity": 0.5}),
    "wanda50": ("Wanda 50%", "wanda", {"sparsity": 0.5}),
    "sgpt50": ("SparseGPT 50%", "sparsegpt", {"sparsity": 0.5}),
    "mag24": ("magnitude 2:4", "magnitude", {"n_m": "2:4"}),
    "wanda24": ("Wanda 2:4", "wanda", {"n_m": "2:4"}),
    "sgpt24": ("SparseGPT 2:4", "sparsegpt", {"n_m": "2:4"}),
}


def prune_config(method: str, kwargs: dict) -> Any:
    from slimkit.prune import MagnitudeConfig, SparseGPTConfig, WandaConfig

    if method == "magnitude":
        return MagnitudeConfig(module_types=["Linear"], exclude=list(DENSE_ONLY), **kwargs)
    return {"wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method](**kwargs)


def prune_row(key: str, fp32: nn.Module, calib: list) -> tuple[nn.Module, dict]:
    """A pruned copy of ``fp32`` for row ``key`` and what it took (``prune_`` wall time, sparsity)."""
    from slimkit.prune import prune_

    _, method, kwargs = PRUNE_ROWS[key]
    model = copy.deepcopy(fp32)
    extra = {} if method == "magnitude" else {"calibration_data": calib, "forward": lm_forward}
    start = time.perf_counter()
    summary = prune_(model, prune_config(method, kwargs), **extra)
    seconds = time.perf_counter() - start
    return model.eval(), {"calib_s": seconds, "sparsity": summary.sparsity, "layers": len(summary.masks)}


def score(key: str, model: nn.Module, test, folder: Path) -> dict:
    """Perplexity and file size of one row's model."""
    from slimkit.metrics.lm import evaluate_perplexity
    from slimkit.prune import save_sparse
    from slimkit.utils.io import save_weights

    save = save_weights if key == "dense" else save_sparse
    out = {"file_bytes": save(model, folder / f"{key}.safetensors")}
    start = time.perf_counter()
    out.update(evaluate_perplexity(model, test))
    out["eval_s"] = time.perf_counter() - start
    return out


def run_rows(keys: list[str], fp32: nn.Module, test, calib: list, prompts, args) -> dict[str, dict]:
    """The dense row and ``keys``, each scored; decode speed of dense and the first pruned row if asked."""
    torch.set_num_threads(args.threads)
    results, timed = {}, {"dense": fp32}
    with tempfile.TemporaryDirectory(prefix="bench-llm-prune-") as tmp:
        results["dense"] = {"label": "dense fp32", **score("dense", fp32, test, Path(tmp))}
        for key in keys:
            log(f"{key}: pruning")
            model, info = prune_row(key, fp32, calib)
            info.update(label=PRUNE_ROWS[key][0], **score(key, model, test, Path(tmp)))
            log(f"{key}: ppl {info['perplexity']:.3f}, prune {info['calib_s']:.0f} s")
            results[key] = info
            if args.generation and len(timed) < 2:
                timed[key] = model
    if args.generation:
        for key, speed in measure_generation(timed, prompts, args).items():
            results[key].update(
                decode_b1=speed[1]["decode_tokens_per_s"], decode_b8=speed[8]["decode_tokens_per_s"]
            )
    dense = results["dense"]["perplexity"]
    for r in results.values():
        r["ratio"] = r["perplexity"] / dense
    return results


def merge(out: Path, run: dict) -> dict:
    """Rows of this run over those of earlier runs (a pruned row's ratio is against its own run's dense row)."""
    merged = json.loads(out.read_text()) if out.exists() else {"rows": {}, "runs": []}
    merged["rows"].update(run["rows"])
    merged["runs"].append(run["setup"])
    return merged


def print_table(merged: dict) -> None:
    for setup in merged["runs"]:
        print(setup["header"] + f"\nrows: {', '.join(setup['rows'])}\n")
    cols = ("row", "ppl", "x dense", "size MB", "sparsity", "decode b1", "decode b8", "calib s")
    print(f"{cols[0]:16s}" + "".join(f"{c:>11s}" for c in cols[1:]))
    for r in merged["rows"].values():
        cells = [
            f"{r['perplexity']:.3f}",
            f"{r['ratio']:.3f}x",
            f"{r['file_bytes'] / 1e6:.1f}",
            "-" if "sparsity" not in r else f"{100 * r['sparsity']:.1f}%",
            f"{r['decode_b1']:.2f}" if "decode_b1" in r else "-",
            f"{r['decode_b8']:.2f}" if "decode_b8" in r else "-",
            f"{r['calib_s']:.0f}" if "calib_s" in r else "-",
        ]
        print(f"{r['label']:16s}" + "".join(f"{c:>11s}" for c in cells))
    rows = merged["rows"]
    print("Targets (issue 14): 50% SparseGPT and Wanda each <= 1.35x dense perplexity, magnitude far worse")
    for key in ("wanda50", "sgpt50"):
        if key in rows:
            ratio = rows[key]["ratio"]
            print(f"  {rows[key]['label']}: {ratio:.3f}x -> {'met' if ratio <= 1.35 else 'NOT met'}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--rows", nargs="*", choices=list(PRUNE_ROWS), default=[], help="dense always runs")
    p.add_argument("--generation", action="store_true", help="time decoding: dense and the first row")
    p.add_argument("--report", action="store_true", help="print the merged table of --out and stop")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llm_prune.json")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.report:
        print_table(json.loads(args.out.read_text()))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from slimkit.models.causal_lm import load_causal_lm
    from slimkit.utils.io import write_json

    load_before, started = uptime(), time.time()
    fp32, tokenizer = load_causal_lm(hf="smollm2")
    test, calib, prompts = load_data(args, tokenizer)
    rows = run_rows(args.rows, fp32, test, calib, prompts, args)
    setup = {
        "header": header(args, test, calib, load_before, uptime()),
        "rows": list(rows),
        "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    merged = merge(args.out, {"rows": rows, "setup": setup})
    write_json(args.out, merged)
    print_table(merged)
    print(f"wall time {setup['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
