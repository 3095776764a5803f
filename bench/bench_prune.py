"""Pruning benchmarks, each run side by side with its unpruned baseline in one process.

1. LeNet-300-100 on MNIST: >= 90% of the weights removed (gradual magnitude pruning with
   fine-tuning), accuracy vs dense, sparse file vs dense fp32 file.
2. A CNN (LeNet-5, 4x wider) with 50% of its channels/neurons removed structurally: MACs,
   latency (interleaved, 2 threads), accuracy after fine-tuning.
3. all-MiniLM-L6-v2 with 50% of the FFN neurons and 50% of the heads removed in every layer:
   parameters and MACs vs the analytic expectation, forward for several shapes, latency
   (64 x 128 tokens, 2 threads) and STS-B dev Spearman right after pruning per criterion.

    .venv/bin/python bench/bench_prune.py --data ../shared/data [--quick] [--only lenet cnn minilm]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from slimkit.data import load_mnist
from slimkit.metrics import compare_latency, count_macs, count_parameters, evaluate
from slimkit.models.builtin import LeNet5, LeNet300100
from slimkit.prune import (
    GradualConfig,
    GradualPruningCallback,
    MagnitudeConfig,
    StructuredConfig,
    finalize_,
    load_sparse,
    prune_,
    save_sparse,
)
from slimkit.train import TrainConfig, Trainer
from slimkit.utils.io import save_weights, write_json
from slimkit.utils.sysinfo import machine_line

ROOT = Path(__file__).resolve().parents[1]


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"### {title}", "", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def test_accuracy(model, data) -> float:
    return 100 * evaluate(model, DataLoader(data, batch_size=512), "classification")["accuracy"]


def fit(model, data, epochs: int, lr: float, callbacks=(), seed: int = 0) -> None:
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=lr, seed=seed, progress=False)
    Trainer(model, cfg, callbacks=list(callbacks)).fit(data)


# -- 1. LeNet-300-100, unstructured -------------------------------------------------------


def gradual_pruning(dense, train, args):
    """Zhu & Gupta schedule 0 -> target over the first 60% of fine-tuning, then masks held; finalised."""
    model = copy.deepcopy(dense)
    steps = args.ft_epochs * -(-len(train) // 64)
    cfg = GradualConfig(
        final_sparsity=args.sparsity, end_step=int(0.6 * steps), frequency=max(1, steps // 40), scope="global"
    )
    callback = GradualPruningCallback(model, cfg)
    fit(model, train, args.ft_epochs, 5e-4, [callback])
    finalize_(model, callback.masks)
    return model, cfg


def bench_lenet(args, out: dict) -> str:
    bundle = load_mnist(args.data, seed=0)
    torch.manual_seed(0)
    dense = LeNet300100()
    fit(dense, bundle.train, args.epochs, 1e-3)
    one_shot = copy.deepcopy(dense)
    prune_(one_shot, MagnitudeConfig(sparsity=args.sparsity, scope="global"))
    gradual, cfg = gradual_pruning(dense, bundle.train, args)
    # Control: the dense model trained for the same extra epochs (is the gain pruning or training?).
    dense_long = copy.deepcopy(dense)
    fit(dense_long, bundle.train, args.ft_epochs, 5e-4)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = save_weights(dense, Path(tmp) / "dense.safetensors")
        models = {"dense": dense, "dense, trained as long": dense_long, "one-shot, no fine-tune": one_shot,
                  "gradual + fine-tune": gradual}  # fmt: skip
        for name, model in models.items():
            sparsity = _weight_sparsity(model)
            size = save_sparse(model, Path(tmp) / "s.safetensors")
            zsize = save_sparse(model, Path(tmp) / "z.safetensors", compress=True)
            exact = _reload_exact(model, Path(tmp) / "s.safetensors")
            acc = test_accuracy(model, bundle.test)
            results[name] = {"sparsity": sparsity, "accuracy": acc, "bytes": size, "bytes_zlib": zsize}
            rows.append([name, f"{100 * sparsity:.1f}%", acc, f"{size / 1024:.0f}", f"{zsize / 1024:.0f}",
                         f"{dense_bytes / size:.1f}x", exact])  # fmt: skip
    drop = results["dense"]["accuracy"] - results["gradual + fine-tune"]["accuracy"]
    drop_long = results["dense, trained as long"]["accuracy"] - results["gradual + fine-tune"]["accuracy"]
    out["lenet"] = {"rows": results, "dense_bytes": dense_bytes, "accuracy_drop": drop,
                    "accuracy_drop_vs_trained_as_long": drop_long, "config": vars(cfg)}  # fmt: skip
    header = [
        "model",
        "weights removed",
        "test acc %",
        "sparse file KiB",
        "+zlib KiB",
        "dense fp32 / sparse",
        "reload exact",
    ]
    note = (
        f"\ndense fp32 safetensors file: {dense_bytes / 1024:.0f} KiB; accuracy drop after fine-tuning: "
        f"{drop:.2f} points (target <= 0.5; {drop_long:.2f} vs the dense model trained as long); "
        "file target >= 5x smaller"
    )
    return table("LeNet-300-100 on MNIST, unstructured magnitude pruning", header, rows) + note


def _weight_sparsity(model) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _reload_exact(model, path: Path) -> bool:
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        p.data.normal_()
    load_sparse(fresh, path)
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


# -- 2. CNN, structured -------------------------------------------------------------------


def bench_cnn(args, out: dict) -> str:
    bundle = load_mnist(args.data, seed=0)
    torch.manual_seed(0)
    dense = LeNet5(width=4)
    fit(dense, bundle.train, args.epochs, 1e-3)
    pruned = copy.deepcopy(dense)
    example = bundle.train[0][0].unsqueeze(0)
    summary = prune_(pruned, StructuredConfig(ratio=0.5, importance="l2"), example_inputs=example)
    acc_pruned = test_accuracy(pruned, bundle.test)
    fit(pruned, bundle.train, args.ft_epochs, 5e-4)
    x = bundle.example_input(args.cnn_batch)
    latency = compare_latency(
        {"dense": lambda: dense(x), "pruned": lambda: pruned(x)}, warmup=5, repeats=args.repeats, threads=2
    )
    rows, results = [], {}
    for name, model in (("dense", dense), ("50% channels removed", pruned)):
        stats = latency["dense" if name == "dense" else "pruned"]
        results[name] = {
            "params": count_parameters(model),
            "macs": count_macs(model, example),
            "accuracy": test_accuracy(model, bundle.test),
            "latency_ms": stats.to_dict(),
        }
        r = results[name]
        rows.append([name, f"{r['params']:,}", f"{r['macs']:,}", r["accuracy"], f"{stats.median_ms:.2f}",
                     f"{latency.speedups['dense' if name == 'dense' else 'pruned']:.2f}x"])  # fmt: skip
    out["cnn"] = {"rows": results, "accuracy_right_after_pruning": acc_pruned, "widths": summary.groups}
    header = [
        "model",
        "params",
        "MACs / image",
        "test acc %",
        f"latency ms (batch {args.cnn_batch})",
        "speedup",
    ]
    note = (
        f"\naccuracy right after pruning (before fine-tuning): {acc_pruned:.2f}%; "
        f"MACs reduced {results['dense']['macs'] / results['50% channels removed']['macs']:.2f}x; "
        "targets: speedup >= 1.6x, accuracy within 1 point"
    )
    return table("LeNet-5 (4x wide) on MNIST, structured channel pruning", header, rows) + note


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="shared data folder")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, repeats and criteria")
    parser.add_argument(
        "--only", nargs="*", default=["lenet", "cnn", "minilm"], choices=["lenet", "cnn", "minilm"]
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune.json"))
    parser.add_argument("--sparsity", type=float, default=0.92)
    parser.add_argument("--criteria", nargs="*", default=None, help="MiniLM importance criteria to compare")
    parser.add_argument("--latency-runs", type=int, default=None, help="MiniLM interleaved latency runs")
    args = parser.parse_args()
    args.epochs, args.ft_epochs = (3, 2) if args.quick else (15, 12)
    args.repeats = 5 if args.quick else 30
    args.lm_repeats = 3 if args.quick else 9
    args.cnn_batch = 256
    return args


def machine() -> dict:
    """The CPU capability beside the load average (slimkit's shared line), and the versions."""
    return {"line": machine_line(), "torch": torch.__version__, "python": platform.python_version()}


def run_record(quick: bool) -> dict:
    """The head of a benchmark's JSON record: when, on what machine, and whether it was a quick run."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "quick": quick}


def main() -> None:
    args = _args()
    torch.set_num_threads(2)
    out = run_record(args.quick)
    texts = []
    for name in args.only:
        start = time.perf_counter()
        if name == "minilm":
            from bench_prune_minilm import bench_minilm  # heavy imports (transformers) only when asked

            text = bench_minilm(args, out)
        else:
            text = {"lenet": bench_lenet, "cnn": bench_cnn}[name](args, out)
        texts.append(text + f"\n(run time {time.perf_counter() - start:.0f} s)")
        print(texts[-1] + "\n", flush=True)
        write_json(args.out, out)
    out["machine_after"] = machine_line()
    print(f"{out['machine']['line']}\n{out['machine_after']}\nresults written to {args.out}")


if __name__ == "__main__":
    main()
