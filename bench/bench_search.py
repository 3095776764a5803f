"""Compression search benchmarks (issue 15).

1. all-MiniLM-L6-v2 on STS-B: the fastest model within one Spearman point of fp32 on the validation
   split (a tenth of STS-B train), latency of one batch of 64 x 128 tokens at 2 threads, a budget
   of ``--minutes`` (60). Space: per-layer bf16/int8, head and FFN pruning per block, dropped blocks,
   recovery by distillation from the fp32 model mixed half and half with the task loss. The search
   times the chosen model beside fp32 eager at the end, interleaved (``measured``); STS-B dev (the
   test split, never searched on) is reported beside the validation figure. Target: at least 8x
   fp32 eager.
2. LeNet-5 (Caffe's 20-50-500-10, as ``bench_storage.py``) on the MNIST split: the smallest file
   within half an accuracy point on the validation split. Space: per-layer int8/int4/codebook,
   channel pruning, unstructured sparsity, recovery. The hand-made Deep-Compression pipeline of
   ``bench_storage.py`` (gradual pruning to 95%, fine-tuned codebooks, entropy coding) runs in the
   same process for the comparison; both start from the same dense model (same seed and data).
3. The digits demo ending with a search: the shipped demo recipe as it is, whose last step searches
   per-layer precision and further channel pruning (objective: latency on this machine, floor: within one point of the
   model it starts from, 30 candidates). Checks that the chosen model is both smaller and faster
   than the trained model (the report's first row) and that the whole demo stays under 2 minutes;
   prints the report table, the search's summary and its Pareto front.

    .venv/bin/python bench/bench_search.py --part 1 --data ../shared/data [--minutes 60]
    .venv/bin/python bench/bench_search.py --part 2 --data ../shared/data
    .venv/bin/python bench/bench_search.py [--part 3] [--output runs/bench_search_demo]

Each part's search state lives beside its output folder, so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from benchlib import log, uptime

from slimkit.data import load_mnist
from slimkit.recipes import load_recipe, run_recipe
from slimkit.report import Report
from slimkit.search import (
    BudgetConfig,
    FloorConfig,
    RecoveryConfig,
    SearchConfig,
    SpaceConfig,
    search,
)
from slimkit.search.space import Candidate
from slimkit.tasks import build_task
from slimkit.utils.io import save_weights, write_json
from slimkit.utils.sysinfo import machine_line

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"


def demo_recipe(output: Path) -> dict:
    """The shipped demo recipe as it is (it ends with its own search step), writing to ``output``."""
    return yaml.safe_load(DEMO.read_text()) | {"output": str(output)}


def part3(output: Path) -> dict:
    path = output.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(demo_recipe(output), sort_keys=False))
    t0 = time.perf_counter()
    run_recipe(load_recipe(path), progress=False)
    seconds = time.perf_counter() - t0
    rows = Report.load(output).to_json()["rows"]
    first, last = rows[0], rows[-1]
    found = json.loads((output / "search.json").read_text())
    return {
        "demo_seconds": round(seconds, 1),
        "search_seconds": last["extra"].get("search_time_s"),
        "trained": {k: first[k] for k in ("size_bytes", "latency_ms")}
        | {"accuracy": first["metrics"]["accuracy"]},
        "chosen": {k: last[k] for k in ("size_bytes", "latency_ms")}
        | {"accuracy": last["metrics"]["accuracy"]},
        "before_search": {k: rows[-2][k] for k in ("size_bytes", "latency_ms")},
        "chosen_candidate": found["chosen"]["label"],
        "met_floor": found["met_floor"],
        "measured": found["measured"],
        "proxy_check": found["signals"]["proxy_check"],
        "table": Report.load(output).to_table(),
    }


MINILM_SPACE = {
    "precision": ["bf16", "int8"],
    "prune_ratios": [0.25, 0.5, 0.75],
    "importance": "output",
    "blocks": [1, 2, 3, 4],
    "recovery": {"top_k": 4, "epochs": 6, "lr": 3e-4, "batch_size": 32, "alpha": 0.5, "time_share": 0.6},
}


def minilm_recipe(data: Path, output: Path, minutes: float) -> dict:
    search = {
        "floor": {"within": 1.0},  # STS-B Spearman x 100: one point
        "objective": "latency",
        "budget": {"minutes": minutes, "max_evaluations": None},  # the clock alone
        "example_size": 64,
        "example_tokens": 128,
        "space": MINILM_SPACE,
    }
    return {
        "name": output.name,
        "seed": 0,
        "model": {"hf": "minilm", "hf_task": "embedding"},
        "data": {"name": "stsb", "path": str(data / "stsb")},
        "steps": [
            {"type": "evaluate", "name": "fp32"},
            {"type": "search", "name": "search", "search": search, "calibration_samples": 256},
        ],
        "measure": {"batch_size": 64, "threads": 2, "repeats": 10, "max_length": 128},
        "output": str(output),
        "overwrite": True,
    }


def part1(data: Path, output: Path, minutes: float) -> dict:
    path = output.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(minilm_recipe(data, output, minutes), sort_keys=False))
    t0 = time.perf_counter()
    run_recipe(load_recipe(path), progress=True)
    found = json.loads((output / "search.json").read_text())
    lines = (output / "candidates.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines[1:]]  # the first line is the log's header
    seconds = time.perf_counter() - t0
    metric_of = {e["key"]: e["metric"] for e in entries}
    return summary(found, [e["phase"] for e in entries], seconds) | {
        "table": Report.load(output).to_table(),
        "recovered": [recovered_row(e, metric_of) for e in entries if e["phase"] == "recover"],
    }


def recovered_row(entry: dict, metric_of: dict[str, float]) -> dict:
    """A recovered candidate: its predicted objective, validation figure before and after (the same
    candidate untrained, by its canonical key), time."""
    before = metric_of.get(Candidate.from_dict(entry["candidate"]).with_recovery(False).key())
    return {
        "label": entry["label"],
        "objective": round(entry["objective"], 1),
        "metric": round(entry["metric"], 2),
        "untrained": None if before is None else round(before, 2),
        "seconds": round(entry["seconds"]),
    }


def summary(found: dict, phases: list[str], seconds: float) -> dict:
    """The search's figures a table needs, from its search.json and its candidates' phases."""
    return {
        "seconds": round(seconds, 1),
        "search_seconds": round(found["seconds"], 1),
        "candidates_by_phase": {p: phases.count(p) for p in dict.fromkeys(phases)},
        "chosen": found["chosen"]["label"],
        "met_floor": found["met_floor"],
        "floor": found["floor"],
        "val": {"baseline": found["baseline"]["metric"], "chosen": found["chosen"]["metric"]},
        "test": {"baseline": found["baseline_test_metrics"], "chosen": found["test_metrics"]},
        "measured": found["measured"],
        "proxy_check": found["signals"]["proxy_check"],
        "signals_seconds": found["signals"]["seconds"],
    }


def part2(data: Path, output: Path, max_evaluations: int) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_prune import fit, test_accuracy
    from bench_storage import CaffeLeNet5, bench_model

    bundle = load_mnist(data, seed=0)
    torch.manual_seed(0)
    dense = CaffeLeNet5()
    fit(dense, bundle.train, 15, 1e-3)  # bench_storage's dense model: same seed, data and schedule
    space = SpaceConfig(
        precision=["int8", "int4", "codebook"],
        codebook_bits=5,
        prune_ratios=[0.25, 0.5],
        sparsity=[0.5, 0.75, 0.9, 0.95],
        recovery=RecoveryConfig(top_k=4, epochs=12, lr=5e-4),
    )
    config = SearchConfig(
        floor=FloorConfig(within=0.005),
        objective="size",
        budget=BudgetConfig(max_evaluations=max_evaluations),
        space=space,
    )
    t0 = time.perf_counter()
    result = search(dense.eval(), build_task(bundle), bundle, config, state_dir=output / "state")
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = save_weights(dense, Path(tmp) / "dense.safetensors")
    hand: dict = {}
    args = argparse.Namespace(
        data=str(data), sparsity={"lenet5": 0.95}, epochs=15, ft_epochs=12, share_epochs=6,
        fc_bits=5, conv_bits=6, share_lr=1e-4,
    )  # fmt: skip
    t1 = time.perf_counter()
    hand_table = bench_model("lenet5", args, hand)
    found = result.to_dict()
    write_json(output / "search.json", found)
    phases = [e.phase for e in result.evaluations]
    return summary(found, phases, seconds) | {
        "dense_bytes": dense_bytes,
        "dense_test_accuracy": test_accuracy(dense, bundle.test),
        "chosen_bytes": int(result.chosen.objective),
        "hand_made": hand["lenet5"]["rows"],
        "hand_made_seconds": round(time.perf_counter() - t1, 1),
        "hand_table": hand_table,
        "front": result.front_table(),
    }


def print_part1(out: dict) -> bool:
    print(out.pop("table"))
    print(json.dumps(out, indent=2))
    m = out["measured"]
    test = out["test"]
    print(
        f"chosen: {out['chosen']}\n"
        f"STS-B validation {out['val']['chosen']:.2f} (fp32 {out['val']['baseline']:.2f}); "
        f"dev (test) {test['chosen']['spearman']:.2f} (fp32 {test['baseline']['spearman']:.2f})\n"
        f"64 x 128 tokens, 2 threads, interleaved: fp32 eager {m['baseline_ms']:.1f} ms, chosen "
        f"{m['chosen_ms']:.1f} ms: {m['speedup']:.2f}x (target >= 8x: {'met' if m['speedup'] >= 8 else 'NOT met'})"
    )
    return out["met_floor"] and m["speedup"] >= 8


def print_part2(out: dict) -> bool:
    print(out.pop("hand_table"))
    print(out.pop("front"))
    print(json.dumps(out, indent=2))
    coded = next(v for k, v in out["hand_made"].items() if k.startswith("+ entropy"))
    acc = 100 * out["test"]["chosen"]["accuracy"]
    print(
        f"dense: {out['dense_bytes']:,} bytes, test accuracy {out['dense_test_accuracy']:.2f}%\n"
        f"search: {out['chosen_bytes']:,} bytes ({out['dense_bytes'] / out['chosen_bytes']:.1f}x), test "
        f"accuracy {acc:.2f}% ({acc - out['dense_test_accuracy']:+.2f}); chosen: {out['chosen']}\n"
        f"hand-made pipeline: {coded['bytes']:,} bytes ({coded['ratio']:.1f}x), test accuracy "
        f"{coded['accuracy']:.2f}%; search / hand-made bytes: {out['chosen_bytes'] / coded['bytes']:.2f}"
    )
    return out["met_floor"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--output", default=None, help="run folder (default: runs/bench_search_<part>)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="shared data folder")
    p.add_argument("--minutes", type=float, default=60.0, help="part 1: the search's budget")
    p.add_argument("--evaluations", type=int, default=80, help="part 2: the search's budget")
    args = p.parse_args()
    torch.set_num_threads(2)
    output = Path(args.output or f"runs/bench_search_{('minilm', 'lenet5', 'demo')[args.part - 1]}")
    print(f"{machine_line()}\n{uptime()}", flush=True)
    if args.part == 1:
        log(f"part 1: all-MiniLM-L6-v2 on STS-B, {args.minutes:g}-minute search")
        ok = print_part1(part1(Path(args.data), output, args.minutes))
    elif args.part == 2:
        log("part 2: LeNet-5 on MNIST, the smallest file within half a point")
        ok = print_part2(part2(Path(args.data), output, args.evaluations))
    else:
        log("part 3: the digits demo ending with a search")
        ok = print_part3(part3(output))
    print(f"machine after: {uptime()}")
    return 0 if ok else 1


def print_part3(out: dict) -> bool:
    print(out.pop("table"))
    print(json.dumps(out, indent=2))
    smaller = out["chosen"]["size_bytes"] < out["trained"]["size_bytes"]
    faster = out["chosen"]["latency_ms"] < out["trained"]["latency_ms"]
    print(
        f"chosen model smaller than the trained one: {smaller}; faster: {faster}; "
        f"demo {out['demo_seconds']} s (< 120 s: {out['demo_seconds'] < 120})"
    )
    return smaller and faster and out["met_floor"]


if __name__ == "__main__":
    sys.exit(main())
