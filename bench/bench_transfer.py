"""Transfer and multi-task learning benchmarks on all-MiniLM-L6-v2.

    .venv/bin/python bench/bench_transfer.py sst2 --data ../shared/data
    .venv/bin/python bench/bench_transfer.py trec --data ../shared/data
    .venv/bin/python bench/bench_transfer.py domains --data ../shared/data
    .venv/bin/python bench/bench_transfer.py sentiment_mt --data ../shared/data

sst2:          linear probe vs full fine-tuning vs LoRA (merged). Training data: all 3000 Sentiment
               Labelled Sentences (yelp, amazon, imdb) plus the train part of a seeded split of the SST-2 dev
               set (872 sentences: load_sst2(seed=0, val_fraction=0.1, test_fraction=0.4), i.e. 436 train,
               87 validation, 349 test). Accuracy is on the 349 held-out SST-2 sentences.
trec:          TREC coarse (6) and fine (50) labels: one multi-task model with two heads against two single-task
               models, each trained with the same total number of optimizer steps of the same batch size
               (train_5500 less a 10% validation split; accuracy on TREC_10).
domains:       source -> target: full fine-tuning on yelp, then adaptation to amazon and imdb from a few
               labelled examples, against training the target with the same few examples directly from MiniLM.
sentiment_mt:  yelp, amazon, imdb and SST-2 as four tasks of one model against four single-task models.

Every run uses torch threads = --threads (2) and max_length --max-length (64). Each part prints a table and
writes the figures to bench/results/transfer_<part>.json. --model takes another encoder folder (a tiny one
makes a quick smoke run); --limit N trains on a class-balanced sample of N examples of every training set
(stated in the tables' titles; the README says where it was used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from slimkit.data import DataBundle, load_sentiment, load_sst2, load_trec
from slimkit.data.base import TextDataset
from slimkit.models.hf import load_hf
from slimkit.train import TrainConfig
from slimkit.transfer import (
    FinetuneConfig,
    HeadConfig,
    LoraSpec,
    MultiTaskConfig,
    TaskSpec,
    finetune,
    train_multitask,
)
from slimkit.transfer.finetune import few_shot
from slimkit.utils.sysinfo import machine_line

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = ("yelp", "amazon", "imdb")


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    text = [list(headers)] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(line[i]) for line in text) for i in range(len(headers))]
    print(f"\n{title}")
    for n, line in enumerate(text):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        if n == 0:
            print("  ".join("-" * width for width in widths))


def write(part: str, figures: dict) -> None:
    figures["machine"] = machine_line()  # the CPU capability beside the load average, as every table
    print(figures["machine"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"transfer_{part}.json").write_text(json.dumps(figures, indent=2) + "\n")


def rows_of(*datasets) -> list[dict]:
    return [d[i] for d in datasets if d is not None for i in range(len(d))]


def limited(data: DataBundle, limit: int | None, seed: int = 0) -> DataBundle:
    if limit is None:
        return data
    train = few_shot(data.train, limit, seed)
    return DataBundle(**{**data.__dict__, "train": TextDataset(rows_of(train))})


def train_config(args, epochs: int, lr: float, monitor: str = "val_loss") -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=lr,
        weight_decay=0.01,
        schedule="cosine",
        warmup_steps=5,
        monitor=monitor,
        seed=args.seed,
        progress=False,
    )


# -- sst2: linear probe vs full vs LoRA -------------------------------------------------------------------
def sst2_data(root: Path, seed: int) -> DataBundle:
    sst = load_sst2(root, seed=seed, val_fraction=0.1, test_fraction=0.4)
    sentiment = [load_sentiment(root, d, seed=seed) for d in DOMAINS]
    train = rows_of(*[x for s in sentiment for x in (s.train, s.val, s.test)], sst.train)
    return DataBundle(
        "sentiment+sst2",
        "classification",
        TextDataset(train),
        sst.test,
        sst.val,
        num_classes=2,
        input_kind="text",
    )


def part_sst2(args, model, tok) -> dict:
    data = limited(sst2_data(args.data, args.seed), args.limit)
    runs = {
        "linear probe": FinetuneConfig(strategy="linear_probe", train=train_config(args, args.epochs, 2e-3)),
        "full fine-tuning": FinetuneConfig(
            strategy="full", head_lr_scale=20.0, train=train_config(args, args.epochs, 5e-5)
        ),
        "LoRA r=8 (merged)": FinetuneConfig(
            strategy="lora",
            lora=LoraSpec(r=8, alpha=16, target_modules=["*.query", "*.key", "*.value", "*.dense"]),
            head_lr_scale=2.0,
            train=train_config(args, args.epochs, 1e-3),
        ),
    }
    print(f"sst2: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test sentences", flush=True)
    figures = {}
    for name, cfg in runs.items():
        if args.strategies and cfg.strategy not in args.strategies:
            continue
        cfg.max_length = args.max_length
        result = finetune(model, data, cfg, tok)
        metrics = _test_metrics(result.model, data, tok, args.max_length)
        figures[name] = {
            **metrics,
            "trainable_params": result.trainable_params,
            "total_params": result.total_params,
            "train_time_s": round(result.train.train_time_s, 1),
            "epochs": len(result.train.history),
            "best_epoch": result.train.best_epoch,
        }
        print(f"  {name}: {figures[name]}", flush=True)
    headers = ["strategy", "SST-2 acc", "macro F1", "trainable", "of total", "train s"]
    rows = [
        [
            n,
            f["accuracy"],
            f["macro_f1"],
            f["trainable_params"],
            f"{f['trainable_params'] / f['total_params']:.2%}",
        ]
        + [f"{f['train_time_s']:.1f}"]
        for n, f in figures.items()
    ]
    title = f"SST-2 held-out accuracy ({len(data.test)} sentences), {len(data.train)} training sentences"
    print_table(f"{title}, {args.epochs} epochs", headers, rows)
    return figures


def _test_metrics(model, data: DataBundle, tok, max_length: int) -> dict:
    from slimkit.tasks import build_task

    return build_task(data, tok, max_length=max_length).evaluate(model, data.test)


# -- trec: multi-task vs single-task ----------------------------------------------------------------------
def part_trec(args, model, tok) -> dict:
    tasks = {label: load_trec(args.data, label=label, seed=args.seed) for label in ("coarse", "fine")}
    if args.limit is not None:  # the same random questions for both labels (natural class frequencies)
        keep = torch.randperm(len(tasks["coarse"].train), generator=torch.Generator().manual_seed(args.seed))
        keep = sorted(keep[: args.limit].tolist())
        for label, data in tasks.items():
            tasks[label] = DataBundle(
                **{**data.__dict__, "train": TextDataset([data.train[i] for i in keep])}
            )
    # one split of the same questions, with two labels each
    assert [r["text"] for r in tasks["coarse"].train.rows] == [r["text"] for r in tasks["fine"].train.rows]
    figures = _mt_vs_single(args, model, tok, tasks, ("fixed", "uncertainty"))
    headers = ["model", "coarse acc", "fine acc", "params", "steps", "train s"]
    rows = [
        [name, f["coarse"], f["fine"], f["params"], f["steps"], f"{f['train_time_s']:.1f}"]
        for name, f in figures.items()
    ]
    n_train = len(tasks["coarse"].train)
    print_table(
        f"TREC_10 accuracy (500 questions), {n_train} training questions, {args.epochs} epochs", headers, rows
    )
    return figures


def _mt_vs_single(args, model, tok, tasks: dict[str, DataBundle], weightings) -> dict:
    """Single-task models, then multi-task models with the summed step budget of the single ones."""
    figures: dict[str, dict] = {}
    single_steps, single_time, single_params = 0, 0.0, 0
    for name, data in tasks.items():
        cfg = FinetuneConfig(strategy="full", head_lr_scale=20.0, train=train_config(args, args.epochs, 5e-5))
        cfg.max_length = args.max_length
        result = finetune(model, data, cfg, tok)
        accuracy = _test_metrics(result.model, data, tok, args.max_length)["accuracy"]
        single_steps += result.train.steps
        single_time += result.train.train_time_s
        single_params += result.total_params
        figures.setdefault("single-task models", {})[name] = accuracy
        print(f"  single {name}: {accuracy:.4f} in {result.train.steps} steps", flush=True)
    figures["single-task models"].update(
        params=single_params, steps=single_steps, train_time_s=round(single_time, 1)
    )
    for weighting in weightings:
        cfg = MultiTaskConfig(
            [TaskSpec(name) for name in tasks],
            weighting=weighting,
            weighting_lr=0.01,
            head_lr_scale=20.0,
            head=HeadConfig(),
            steps_per_epoch=single_steps // args.epochs,
            max_length=args.max_length,
            train=train_config(args, args.epochs, 5e-5, monitor="val_score"),
        )
        result = train_multitask(model, tasks, cfg, tok)
        row = {name: m["accuracy"] for name, m in result.metrics.items()}
        row.update(
            params=sum(p.numel() for p in result.model.parameters()),
            steps=result.train.steps,
            train_time_s=round(result.train.train_time_s, 1),
            weights={k: round(v, 3) for k, v in result.weights.items()},
        )
        figures[f"multi-task ({weighting})"] = row
        print(f"  multi-task {weighting}: {row}", flush=True)
    return figures


# -- domains: source -> target ----------------------------------------------------------------------------
def part_domains(args, model, tok) -> dict:
    source = limited(load_sentiment(args.data, "yelp", seed=args.seed), args.limit)
    source_cfg = FinetuneConfig(
        strategy="full", head_lr_scale=20.0, train=train_config(args, args.epochs, 5e-5)
    )
    source_cfg.max_length = args.max_length
    on_source = finetune(model, source, source_cfg, tok)
    source_acc = _test_metrics(on_source.model, source, tok, args.max_length)["accuracy"]
    print(f"  source yelp: test accuracy {source_acc:.4f}", flush=True)
    figures: dict = {"source_yelp_accuracy": source_acc, "targets": {}}
    rows = []
    for domain in ("amazon", "imdb"):
        # No validation split: choosing epochs on 100 more labelled sentences would not be few-shot.
        target = DataBundle(**{**load_sentiment(args.data, domain, seed=args.seed).__dict__, "val": None})
        for n in args.shots:
            cfg = FinetuneConfig(
                strategy="full", n_train=n, head_lr_scale=20.0, train=train_config(args, 10, 3e-5)
            )
            cfg.max_length = args.max_length
            zero = _test_metrics(on_source.model, target, tok, args.max_length)["accuracy"]
            transfer = _test_metrics(
                finetune(on_source.model, target, cfg, tok).model, target, tok, args.max_length
            )
            direct = _test_metrics(finetune(model, target, cfg, tok).model, target, tok, args.max_length)
            figures["targets"][f"{domain}_{n}"] = {
                "yelp_model_zero_shot": zero,
                "yelp_then_target": transfer["accuracy"],
                "target_only": direct["accuracy"],
            }
            rows.append([domain, n, zero, transfer["accuracy"], direct["accuracy"]])
            print(f"  {domain} n={n}: {figures['targets'][f'{domain}_{n}']}", flush=True)
    headers = ["target", "labelled", "yelp model as is", "yelp -> target", "MiniLM -> target"]
    print_table(
        f"Target test accuracy (200 sentences each); source yelp test accuracy {source_acc:.4f}",
        headers,
        rows,
    )
    return figures


# -- sentiment_mt: four sentiment tasks in one model ------------------------------------------------------
def part_sentiment_mt(args, model, tok) -> dict:
    tasks = {d: limited(load_sentiment(args.data, d, seed=args.seed), args.limit) for d in DOMAINS}
    tasks["sst2"] = limited(load_sst2(args.data, seed=args.seed), args.limit)
    figures = _mt_vs_single(args, model, tok, tasks, ("fixed",))
    headers = ["model", *tasks, "params", "steps", "train s"]
    rows = [
        [n, *[f[t] for t in tasks], f["params"], f["steps"], f"{f['train_time_s']:.1f}"]
        for n, f in figures.items()
    ]
    print_table("Test accuracy per task", headers, rows)
    return figures


PARTS = {"sst2": part_sst2, "trec": part_trec, "domains": part_domains, "sentiment_mt": part_sentiment_mt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shots", type=int, nargs="+", default=[16, 64])
    p.add_argument("--limit", type=int, default=None, help="cap every training set (class-balanced sample)")
    p.add_argument("--strategies", nargs="+", default=None, help="sst2: run only these strategies")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, tok = load_hf(args.model, "embedding")
    started = time.perf_counter()
    figures = PARTS[args.part](args, model, tok)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write(
        args.part,
        {"settings": settings, "figures": figures, "wall_s": round(time.perf_counter() - started, 1)},
    )
    print(f"\n{args.part}: {time.perf_counter() - started:.0f} s with {args.threads} threads", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
