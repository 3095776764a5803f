"""Activation-function replacement: does a cheaper activation pay off on this CPU, and what does it cost?

Parts (each one process, each well under 8 minutes; results merge into one JSON file):

- ``cnn``: the digits CNN with GELU (``DigitsCNN(activation="gelu")``; the demo's CNN is ReLU
  already), trained as the demo trains it; then GELU -> ReLU, hard-GELU and a 16-segment
  piecewise-linear table: test accuracy as replaced and after a 2-epoch recovery fine-tune, latency
  at batch 64 (interleaved medians) and GELU's share of the float model's time (torch.profiler).
- ``minilm-speed``: all-MiniLM-L6-v2, fp32 eager, 2 threads, 64 sequences x 128 real tokens
  (``bench_quant.packed_batch``): latency of the original and each replacement interleaved, GELU's
  share of the forward, and STS-B dev Spearman of each as replaced (no recovery).
- ``minilm-recover --target T``: T = relu, hardswish or pwl; recovery by distillation from the
  original model (``slimkit.distill.distill_``: cosine of the sentence embeddings plus MSE of every
  block's output) on STS-B *train* sentences (less those also in dev) for ``--steps`` steps (at most
  one pass), then STS-B dev Spearman.
- ``table``: the merged results as one table, with the machine line and uptime.

    flock /work/spec/heavy.lock .venv/bin/python bench/bench_activations.py --part cnn
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from bench_prune_minilm import sts_spearman
from bench_quant import load_minilm, packed_batch
from benchlib import log, uptime

from slimkit.activations import ReplaceActivationsConfig, replace_activations_
from slimkit.data.text import read_stsb_file
from slimkit.metrics import compare_latency
from slimkit.models.hf import SentenceEncoder
from slimkit.utils.io import write_json
from slimkit.utils.sysinfo import machine_line

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "relu": ReplaceActivationsConfig(to="relu"),
    "hardswish": ReplaceActivationsConfig(to="hardswish"),
    "pwl": ReplaceActivationsConfig(to="pwl", pwl_segments=16),
}
LABELS = {"gelu": "GELU (original)", "relu": "ReLU", "hardswish": "hard-GELU", "pwl": "PWL 16 segments"}


def replaced(model: torch.nn.Module, target: str) -> torch.nn.Module:
    out = copy.deepcopy(model)
    # only the encoder's GELUs: MiniLM's pooler tanh is not on the embedding path
    replace_activations_(out, dataclasses.replace(TARGETS[target], from_=["gelu"]))
    return out.eval()


def op_share(model, inputs: dict | torch.Tensor, ops: tuple[str, ...]) -> dict[str, float]:
    """Each op's share of one forward's self CPU time (torch.profiler), in percent."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        call = (lambda: model(**inputs)) if isinstance(inputs, dict) else (lambda: model(inputs))
        call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return {op: 100 * sum(e.self_cpu_time_total for e in events if e.key == op) / total for op in ops}


# -- digits CNN --------------------------------------------------------------------------------------
def cnn(args) -> dict:
    from slimkit.data.digits import load_digits
    from slimkit.metrics.task import evaluate
    from slimkit.models import DigitsCNN
    from slimkit.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    bundle = load_digits(seed=0)
    loader = torch.utils.data.DataLoader(bundle.test, batch_size=256)

    def acc(m) -> float:
        return 100 * evaluate(m.eval(), loader, "classification")["accuracy"]

    torch.manual_seed(0)
    model = DigitsCNN(activation="gelu")
    demo = TrainConfig(  # the demo recipe's train step
        epochs=10, batch_size=64, optimizer="adamw", lr=0.003, weight_decay=0.01, schedule="cosine",
        warmup_steps=20, seed=0, progress=False,
    )  # fmt: skip
    Trainer(model, demo).fit(bundle.train)
    rows = {"gelu": {"acc": acc(model), "recovered": None}}
    variants = {"gelu": model}
    recover = TrainConfig(epochs=2, batch_size=64, optimizer="adamw", lr=0.001, seed=1, progress=False)
    for target in TARGETS:
        m = copy.deepcopy(model)
        summary = replace_activations_(m, TARGETS[target])
        row = {"acc": acc(m), "max_abs_error": summary.max_error["gelu"]}
        Trainer(m.train(), recover).fit(bundle.train)
        row["recovered"] = acc(m)
        rows[target], variants[target] = row, m.eval()
    x = torch.stack([bundle.test[i][0] for i in range(64)])
    lat = compare_latency(
        {k: (lambda m=m: m(x)) for k, m in variants.items()},
        warmup=20,
        repeats=args.cnn_repeats,
        threads=args.threads,
    )
    for k, row in rows.items():
        row.update(latency_ms=lat[k].median_ms, speedup=lat.speedups[k])
    share = op_share(model, x, ("aten::gelu",))["aten::gelu"]
    return {"rows": rows, "gelu_share_pct": share, "batch": 64, "recovery": "fine-tune 2 epochs, lr 1e-3"}


# -- MiniLM ------------------------------------------------------------------------------------------
def stsb(args, name: str) -> list[dict]:
    return read_stsb_file(Path(args.data) / "stsb" / name)


def minilm_speed(args, save) -> dict:
    """Latency first (saved), then each variant's STS-B dev score (saved after each: a run cut
    short by the lock's time limit keeps what it measured)."""
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    dev = stsb(args, "sts-dev.csv")
    example = packed_batch(tok, dev, args.batch, args.seq)
    variants = {"gelu": model, **{t: replaced(model, t) for t in TARGETS}}
    log("timing")
    fns = {k: (lambda m=m: m(**example)) for k, m in variants.items()}
    lat = compare_latency(fns, warmup=2, repeats=args.repeats, threads=args.threads)
    with torch.inference_mode():
        h = torch.randn(args.batch * args.seq, 1536)  # one FFN activation's input (64 x 128 x 1536)
        acts = {k: m.encoder.layer[0].intermediate.intermediate_act_fn for k, m in variants.items()}
        alone = compare_latency({k: (lambda a=a: a(h)) for k, a in acts.items()}, warmup=3, repeats=15)
    layers = len(model.encoder.layer)
    rows = {}
    for k in variants:
        rows[k] = {"latency_ms": lat[k].median_ms, "p95_ms": lat[k].p95_ms, "speedup": lat.speedups[k]}
        rows[k]["one_activation_ms"] = alone[k].median_ms
        # the activations' share of the forward: every layer's activation timed alone / the forward
        rows[k]["act_share_pct"] = 100 * layers * alone[k].median_ms / rows[k]["latency_ms"]
    res = {"rows": rows, "input": f"{args.batch} x {args.seq} tokens (packed STS-B dev text)"}
    res["gelu_profiler_share_pct"] = op_share(model, example, ("aten::gelu",))["aten::gelu"]
    save(res)
    for k, m in variants.items():
        log(f"STS-B dev: {k}")
        rows[k]["stsb_as_replaced"] = sts_spearman(SentenceEncoder(m), tok, dev)
        save(res)
    return res


def sentence_batches(tok, sentences: list[str], size: int) -> list[dict]:
    """Length-sorted batches padded to their longest sentence (training is mostly short sentences)."""
    order = sorted(sentences, key=len)
    out = []
    for i in range(0, len(order), size):
        b = tok(order[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return out


class Batches(torch.utils.data.Dataset):
    """Pre-made batches as items (the loader's batch size is 1 and its collate unwraps them)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def minilm_recover(args) -> dict:
    from slimkit.distill import DistillConfig, distill_
    from slimkit.distill.api import no_label_loss
    from slimkit.train import TrainConfig

    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    teacher = SentenceEncoder(model).eval()
    student = SentenceEncoder(replaced(model, args.target))
    dev, train = stsb(args, "sts-dev.csv"), stsb(args, "sts-train.csv")
    # STS-B's train and dev files share some sentences (249): leave those out so that the dev
    # score is measured on text the recovery never saw
    in_train = {s for r in train for s in (r["text"], r["text_pair"])}
    left_out = in_train & {s for r in dev for s in (r["text"], r["text_pair"])}
    sentences = sorted(in_train - left_out)
    data = Batches(sentence_batches(tok, sentences, args.distill_batch))
    before = args.before.get(args.target, {}).get("stsb_as_replaced")  # measured by minilm-speed
    before = sts_spearman(student, tok, dev) if before is None else before
    config = DistillConfig(output_loss="cosine", alpha=1.0, hidden_weight=1.0, hidden_loss="mse")
    train_cfg = TrainConfig(
        epochs=1,
        batch_size=1,
        lr=args.distill_lr,
        optimizer="adamw",
        max_steps=args.steps,
        seed=0,
        progress=False,
    )
    start = time.perf_counter()
    result = distill_(
        student.train(), teacher, data, config, train_cfg, loss_fn=no_label_loss, collate_fn=lambda b: b[0]
    )
    seconds = time.perf_counter() - start
    after = sts_spearman(student.eval(), tok, dev)
    log(f"{args.target}: STS-B {before:.2f} -> {after:.2f} in {seconds:.0f} s")
    return {
        "stsb_as_replaced": before,
        "stsb_recovered": after,
        "steps": result.train.steps,
        "sentences_seen": min(result.train.steps * args.distill_batch, len(sentences)),
        "train_sentences": len(sentences),
        "dev_sentences_left_out": len(left_out),
        "recovery_s": seconds,
        "losses": result.losses,
        "lr": args.distill_lr,
    }


# -- the table ---------------------------------------------------------------------------------------
def print_table(res: dict) -> None:
    cnn_res, speed, recover = res.get("cnn"), res.get("minilm_speed"), res.get("minilm_recover", {})
    if cnn_res:
        print(f"digits CNN (GELU variant), batch {cnn_res['batch']}, {cnn_res['recovery']}:")
        print(f"{'activation':18s} {'latency ms':>10s} {'speedup':>8s} {'acc %':>7s} {'recovered':>9s}")
        for k, r in cnn_res["rows"].items():
            rec = "" if r["recovered"] is None else f"{r['recovered']:9.2f}"
            print(f"{LABELS[k]:18s} {r['latency_ms']:10.3f} {r['speedup']:7.2f}x {r['acc']:7.2f} {rec:>9s}")
        print(f"GELU share of the CNN's forward: {cnn_res['gelu_share_pct']:.1f}%")
    if speed:
        print(f"\nall-MiniLM-L6-v2 fp32 eager, {speed['input']}, STS-B dev Spearman x100:")
        head = f"{'activation':18s} {'latency ms':>10s} {'speedup':>8s} {'act ms':>7s} {'act %':>6s} {'STS-B':>7s} {'recovered':>9s}"
        print(head + "\n" + "-" * len(head))
        for k, r in speed["rows"].items():
            rec = recover.get(k, {}).get("stsb_recovered")
            rec_s = "" if rec is None else f"{rec:9.2f}"
            sts = r.get("stsb_as_replaced")
            sts_s = "" if sts is None else f"{sts:7.2f}"
            print(
                f"{LABELS[k]:18s} {r['latency_ms']:10.0f} {r['speedup']:7.3f}x {r['one_activation_ms']:7.1f} "
                f"{r['act_share_pct']:6.1f} {sts_s:>7s} {rec_s:>9s}"
            )
        print(
            f"aten::gelu share of the original's forward by torch.profiler: {speed['gelu_profiler_share_pct']:.1f}%"
        )
        for k, r in recover.items():
            print(
                f"  recovery {k}: {r['steps']} steps ({r['sentences_seen']} sentences), {r['recovery_s']:.0f} s"
            )
    print(res.get("machine", machine_line()))
    print("uptime:", uptime())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--part", choices=("cnn", "minilm-speed", "minilm-recover", "table"), required=True)
    p.add_argument("--target", choices=tuple(TARGETS), default="relu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cnn-repeats", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=150, help="distillation steps (batches) of recovery")
    p.add_argument("--distill-batch", type=int, default=32)
    p.add_argument("--distill-lr", type=float, default=5e-5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "activations.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save(key: str, value) -> None:
        res[key] = value
        res["machine"] = machine_line()
        res[f"uptime_{args.part}"] = uptime()
        res["threads"] = args.threads
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)

    args.before = res.get("minilm_speed", {}).get("rows", {})
    if args.part == "cnn":
        save("cnn", cnn(args))
    elif args.part == "minilm-speed":
        minilm_speed(args, lambda value: save("minilm_speed", value))
    elif args.part == "minilm-recover":
        save("minilm_recover", {**res.get("minilm_recover", {}), args.target: minilm_recover(args)})
    print_table(res)


if __name__ == "__main__":
    main()
