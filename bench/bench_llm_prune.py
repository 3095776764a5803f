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


COLUMNS = (
    "row",
    "ppl",
    "x dense",
    "params M",
    "size MB",
    "sparsity",
    "dec b1",
    "dec b8",
    "b1 x",
    "calib s",
    "recov min",
)


def _cells(r: dict) -> list[str]:
    def num(key: str, fmt: str, scale: float = 1.0) -> str:
        return "-" if r.get(key) is None else format(r[key] * scale, fmt)

    return [
        f"{r['perplexity']:.3f}",
        f"{r['ratio']:.3f}x",
        num("params", ".1f", 1e-6),
        num("file_bytes", ".1f", 1e-6),
        num("sparsity", ".1%"),
        num("decode_b1", ".2f"),
        num("decode_b8", ".2f"),
        "-" if r.get("speedup_b1") is None else f"{r['speedup_b1']:.2f}x",
        num("calib_s", ".0f"),
        num("recovery_min", ".1f"),
    ]


def print_table(merged: dict, states: list[Path] = ()) -> None:
    for setup in merged["runs"]:
        print(setup["header"] + f"\nrows: {', '.join(setup['rows'])}\n")
    dense_b1 = merged["rows"].get("dense", {}).get("decode_b1")
    rows = {  # copies: the merged rows stay as they were read
        k: {**r, "speedup_b1": r["decode_b1"] / dense_b1} if dense_b1 and r.get("decode_b1") else dict(r)
        for k, r in merged["rows"].items()
    }
    for state in states:
        extra = state_rows(state)
        if "dense" in rows and extra:
            rows["dense"] = {**rows["dense"], "params": next(iter(extra.values()))["params_dense"]}
        rows.update(extra)
    print(f"{COLUMNS[0]:34s}" + "".join(f"{c:>10s}" for c in COLUMNS[1:]))
    for r in rows.values():
        print(f"{r['label'][:34]:34s}" + "".join(f"{c:>10s}" for c in _cells(r)))
    print("Targets (issue 14): 50% SparseGPT and Wanda each <= 1.35x dense perplexity, magnitude far worse")
    for key in ("wanda50", "sgpt50"):
        if key in rows:
            ratio = rows[key]["ratio"]
            print(f"  {rows[key]['label']}: {ratio:.3f}x -> {'met' if ratio <= 1.35 else 'NOT met'}")
    for line in state_targets(rows):
        print(line)


def state_targets(rows: dict) -> list[str]:
    """The depth and pruned + int4 targets, for the rows present."""
    out = []
    rec = rows.get("depth_recovered")
    if rec:
        ok = rec["ratio"] <= 1.15 and rec.get("speedup_b1", 0) >= 1.3 and rec.get("recovery_min", 99) <= 60
        out.append(
            f"  22 blocks after <= 60 min recovery: ppl {rec['ratio']:.3f}x (<= 1.15x), decode b1 "
            f"{rec.get('speedup_b1', 0):.2f}x (>= 1.3x), {rec.get('recovery_min', 0):.0f} min -> "
            f"{'met' if ok else 'NOT met'}"
        )
    for key in [k for k in rows if k.endswith("_quantized") or k.endswith("_quantized+compile")]:
        r = rows[key]
        ok = r["ratio"] <= 1.25 and r.get("speedup_b1", 0) >= 4
        out.append(
            f"  {key}: decode b1 {r.get('speedup_b1', 0):.2f}x dense fp32 eager (>= 4x), ppl "
            f"{r['ratio']:.3f}x (<= 1.25x) -> {'met' if ok else 'NOT met'}"
        )
    return out


def _speed(decode: dict, name: str, batch: int) -> float | None:
    entry = decode.get(name, {}).get(str(batch))  # read back from JSON: batch sizes are strings
    return None if entry is None else entry["decode_tokens_per_s"]


def _decode_cells(decode: dict, name: str) -> dict:
    """Decode b1/b8 of ``name`` and its b1 ratio to the dense fp32 eager row of the same run."""
    b1, b8, dense = _speed(decode, name, 1), _speed(decode, name, 8), _speed(decode, "dense", 1)
    out = {} if b1 is None else {"decode_b1": b1, "decode_b8": b8}
    if b1 is not None and dense:
        out["speedup_b1"] = b1 / dense
    return out


def _quant_rows(mode: str, quant: dict, params: int) -> dict[str, dict]:
    labels = {"quantized": "  + GPTQ int4 g64, int8 head", "quantized+compile": "    + compile"}
    return {
        f"{mode}_{name}": {
            "label": label,
            "perplexity": quant["perplexity"],
            "params": params,
            "file_bytes": quant["file_bytes"],
            "calib_s": quant["calib_s"],
            **_decode_cells(quant["decode"], name),
        }
        for name, label in labels.items()
    }


def state_rows(state: Path) -> dict[str, dict]:
    """Rows of one ``bench_llm_distill.py`` state folder: pruned, recovered, quantized (those run)."""
    from bench_llm_distill import read_state

    prune, train, ev, quant = (read_state(state, f"{n}.json") for n in ("prune", "train", "eval", "quant"))
    if not prune:
        return {}
    mode = prune.get("mode", "depth")
    what = (
        f"{len(prune['dropped'])} blocks dropped"
        if mode == "depth"
        else f"FFN {prune['intermediate_size']}, KV heads {prune['num_key_value_heads']}"
    )
    size = sum(f.stat().st_size for f in (state / "student").glob("*.safetensors"))
    base = {"params": prune["params_pruned"], "params_dense": prune["params_dense"], "file_bytes": size}
    rows = {
        f"{mode}_pruned": {
            "label": f"{mode}: {what}", "perplexity": prune["pruned_ppl"], "calib_s": prune["prune_s"], **base
        }
    }  # fmt: skip
    if ev.get("recovered_ppl") is not None:
        minutes = sum(p["wall_s"] for p in train.get("pieces", [])) / 60
        recovered = {"perplexity": ev["recovered_ppl"], "recovery_min": minutes, **base}
        rows[f"{mode}_recovered"] = {
            "label": f"  recovered, {ev['steps']} steps",
            **recovered,
            **_decode_cells(ev.get("decode") or quant.get("decode", {}), "student"),
        }
        compiled = _decode_cells(quant.get("decode", {}), "student+compile")
        if compiled:
            rows[f"{mode}_recovered+compile"] = {"label": "    + compile", **recovered, **compiled}
    if quant:
        rows.update(_quant_rows(mode, quant, prune["params_pruned"]))
    for r in rows.values():
        r["ratio"] = r["perplexity"] / prune["dense_ppl"]
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--rows", nargs="*", choices=list(PRUNE_ROWS), default=[], help="dense always runs")
    p.add_argument("--generation", action="store_true", help="time decoding: dense and the first row")
    p.add_argument("--report", action="store_true", help="print the merged table of --out and stop")
    p.add_argument(
        "--states",
        nargs="*",
        type=Path,
        default=[],
        help="--report: bench_llm_distill.py state folders to add",
    )
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
        print_table(json.loads(args.out.read_text()), args.states)
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
