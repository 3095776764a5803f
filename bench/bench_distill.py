"""Distillation benchmarks.

    .venv/bin/python bench/bench_distill.py hinton --data ../shared/data
    .venv/bin/python bench/bench_distill.py minilm --data ../shared/data
    .venv/bin/python bench/bench_distill.py recover --data ../shared/data

hinton:  Hinton et al. (2015) on MNIST: a large MLP teacher (1200-1200, dropout, jittered inputs) and a
         small student (800-800, no regularisation) trained on hard labels alone or with soft targets.
minilm:  all-MiniLM-L6-v2 teaches a 3-layer student built from every other teacher layer, by embedding
         distillation on unlabeled sentences (STS-B train and the other text sets); STS-B dev Spearman and
         latency (batch 64 x 128 tokens, 2 threads) of teacher and student measured in the same run.
recover: the MiniLM pruned as in bench_prune_minilm.py (50% FFN neurons, 50% heads) recovered by
         distillation from the unpruned teacher.

Options of minilm/recover beyond the defaults: --hidden-weight/--hidden-loss add token-level distillation of
every block's hidden states (the teacher then runs on every step: its cache holds embeddings only),
--loss none drops the embedding term, --extra-text adds the sentences of a WikiText file under --data,
--eval-epochs scores STS-B dev after every epoch, and recover --device cuda trains and scores on a GPU
(latency, a CPU figure, is then not measured).

Each prints a table and writes the figures to bench/results/distill_<name>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from slimkit.data import load_mnist
from slimkit.distill import DistillConfig, distill_
from slimkit.distill.students import MLP
from slimkit.metrics import count_parameters
from slimkit.train import Callback, TrainConfig, Trainer
from slimkit.utils.io import write_json
from slimkit.utils.sysinfo import machine_line

RESULTS = Path(__file__).resolve().parent / "results"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def save(name: str, figures: dict, out: str | None = None) -> None:
    figures["machine"] = machine_line()  # the CPU capability beside the load average, as every table
    print(figures["machine"])
    path = Path(out) if out else RESULTS / f"distill_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, figures)


# -- 1. Hinton's MNIST ---------------------------------------------------------------------------------
class Jittered(Dataset):
    """Images shifted by up to ``pixels`` in each direction (zero fill), freshly drawn on every access."""

    def __init__(self, base: TensorDataset, pixels: int = 2):
        self.x, self.y = base.tensors
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        dx, dy = torch.randint(-self.pixels, self.pixels + 1, (2,)).tolist()
        img = torch.roll(self.x[i], shifts=(dy, dx), dims=(1, 2))
        if dy > 0:
            img[:, :dy] = 0
        elif dy < 0:
            img[:, dy:] = 0
        if dx > 0:
            img[:, :, :dx] = 0
        elif dx < 0:
            img[:, :, dx:] = 0
        return img, self.y[i]


def test_errors(model: torch.nn.Module, data: TensorDataset) -> int:
    x, y = data.tensors
    with torch.no_grad():
        return int((model.eval()(x).argmax(1) != y).sum())


def hinton(args) -> dict:
    bundle = load_mnist(args.data, seed=0)
    train_cfg = dict(
        batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", progress=False
    )
    torch.manual_seed(0)
    teacher = MLP(784, 10, hidden=(1200, 1200), dropout=0.5, input_dropout=0.2)
    t0 = time.perf_counter()
    Trainer(teacher, TrainConfig(epochs=args.teacher_epochs, seed=0, **train_cfg)).fit(Jittered(bundle.train))
    teacher_time = time.perf_counter() - t0
    rows = [
        [
            "teacher 1200-1200 (dropout, jitter)",
            count_parameters(teacher),
            test_errors(teacher, bundle.test),
            "-",
        ]
    ]
    figures = {"teacher": {"errors": rows[0][2], "train_s": teacher_time}, "students": []}
    for seed in range(args.seeds):
        for name, soft in (("hard labels", False), (f"soft targets T={args.temperature:g}", True)):
            torch.manual_seed(100 + seed)
            student = MLP(784, 10, hidden=(800, 800))
            cfg = TrainConfig(epochs=args.student_epochs, seed=seed, **train_cfg)
            t0 = time.perf_counter()
            if soft:
                kd = DistillConfig(temperature=args.temperature, alpha=args.alpha)
                distill_(student, teacher, bundle.train, kd, cfg)
            else:
                Trainer(student, cfg).fit(bundle.train)
            errors = test_errors(student, bundle.test)
            figures["students"].append(
                {"seed": seed, "soft": soft, "errors": errors, "train_s": time.perf_counter() - t0}
            )
            rows.append([f"student 800-800, {name}", count_parameters(student), errors, seed])
            print(f"  seed {seed} {name}: {errors} errors", file=sys.stderr, flush=True)
    n_test = len(bundle.test)
    for soft in (False, True):
        errs = [s["errors"] for s in figures["students"] if s["soft"] == soft]
        figures["mean_hard" if not soft else "mean_soft"] = sum(errs) / len(errs)
    print(f"\nMNIST ({len(bundle.train)} train images, {n_test} test images; errors out of {n_test})")
    print(table(["model", "params", "test errors", "seed"], rows))
    print(
        f"\nmean errors over {args.seeds} seed(s): hard labels {figures['mean_hard']:.1f}, "
        f"soft targets {figures['mean_soft']:.1f}; teacher {figures['teacher']['errors']}"
    )
    figures["config"] = _config(args)
    return figures


# -- 2. and 3. MiniLM ------------------------------------------------------------------------------------
def unlabeled_sentences(root: str) -> list[str]:
    """Distinct sentences of STS-B train and the other labelled text sets (labels unused); STS-B dev excluded."""
    from slimkit.data import load_sentiment, load_sst2, load_trec
    from slimkit.data.text import read_stsb_file

    texts = [
        t for r in read_stsb_file(Path(root) / "stsb" / "sts-train.csv") for t in (r["text"], r["text_pair"])
    ]
    bundles = [load_sentiment(root, d) for d in ("amazon", "imdb", "yelp")] + [
        load_sst2(root),
        load_trec(root),
    ]
    for b in bundles:
        for split in (b.train, b.val, b.test):
            texts += [split[i]["text"] for i in range(len(split))] if split is not None else []
    return sorted({t.strip() for t in texts if t.strip()})


def seeded_subset(items: list[str], n: int | None) -> list[str]:
    """``n`` items drawn with a fixed seed (all of them when ``n`` is None or not smaller), in order."""
    if not n or n >= len(items):
        return items
    pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:n]
    return [items[i] for i in sorted(pick.tolist())]


def pick_sentences(args) -> list[str]:
    """The unlabeled sentences (``--max-sentences`` of them), plus ``--extra-text`` sentences if given."""
    sentences = seeded_subset(unlabeled_sentences(args.data), args.max_sentences)
    if args.extra_text:
        path = Path(args.data) / args.extra_text
        extra = seeded_subset(wikitext_sentences(path), args.max_extra)
        print(f"  {len(extra)} extra sentences from {path}", file=sys.stderr, flush=True)
        sentences = sorted(set(sentences) | set(extra))
    return sentences


# WikiText's tokenization: numbers split as "1 @,@ 000", punctuation set off by spaces.
_WIKI_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" n't", "n't"), ("( ", "("), (" )", ")"))
_SPACE_BEFORE = re.compile(r" ([.,;:!?%]|'s\b|'\s)")
_SENTENCE_END = re.compile(r"(?<=[.!?]) (?=[A-Z0-9\"(])")


def wikitext_sentences(path: Path, min_words: int = 5, max_words: int = 64) -> list[str]:
    """Sentences of a WikiText file (one paragraph a line, ``= Heading =`` lines), detokenized.

    Headings and empty lines are skipped, and so are very short or long sentences and those with more
    than one ``<unk>`` (rare words WikiText replaced); a single one becomes BERT's own ``[UNK]`` token.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--extra-text: no such file {path}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):
            continue
        for a, b in _WIKI_JOINS:
            line = line.replace(a, b)
        line = _SPACE_BEFORE.sub(r"\1", line)
        for sentence in _SENTENCE_END.split(line):
            if sentence.count("<unk>") <= 1 and min_words <= len(sentence.split()) <= max_words:
                out.append(sentence.replace("<unk>", "[UNK]"))
    return sorted(set(out))


def sts_dev(root: str, tok, device: str = "cpu"):
    """``score(model)``: STS-B dev Spearman x100, the batches moved to ``device`` (the model's)."""
    import dataclasses

    from slimkit.batch import to_device
    from slimkit.data import load_stsb
    from slimkit.tasks import build_task, pair_forward

    bundle = load_stsb(root)
    task = build_task(bundle, tok)
    if device != "cpu":

        def moved(model, batch):  # the embeddings come back to the CPU, where the gold scores are
            return tuple(e.cpu() for e in pair_forward(model, to_device(batch, device)))

        task = dataclasses.replace(task, forward=moved)
    return lambda model: task.evaluate(model, bundle.test)["spearman"]


def latency_batch(root: str, tok) -> dict[str, torch.Tensor]:
    """64 STS-B dev sentences padded to 128 tokens: the batch the speed targets are stated for."""
    from slimkit.data.text import read_stsb_file

    rows = read_stsb_file(Path(root) / "stsb" / "sts-dev.csv")[:64]
    enc = tok(
        [r["text"] for r in rows], padding="max_length", truncation=True, max_length=128, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class TimeBudget(Callback):
    """Stop training once ``seconds`` have passed (the benchmark's wall-time limit); records whether it hit."""

    def __init__(self, seconds: float):
        self.seconds, self.hit, self._start = seconds, False, 0.0

    def on_train_begin(self, trainer) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, trainer) -> None:
        if time.perf_counter() - self._start > self.seconds:
            self.hit = True
            trainer.state["stopped_early"] = True


class EpochScores(Callback):
    """STS-B dev after every epoch (``--eval-epochs``): how recovery progresses, in the history."""

    def __init__(self, score):
        self.score = score

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        metrics["sts_dev"] = self.score(trainer.model)
        print(f"  epoch {metrics['epoch']}: STS-B dev {metrics['sts_dev']:.2f}", file=sys.stderr, flush=True)


def length_buckets(sentences: list[str], tok, batch_size: int) -> list[list[str]]:
    """Batches of sentences of similar token length: padding to the longest in a batch then costs little."""
    lengths = [len(ids) for ids in tok(sentences, truncation=True, max_length=128)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], sentences[i]))
    return [[sentences[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def distill_config(args) -> DistillConfig:
    """The losses of ``args``; the teacher-output cache only when no hidden states are distilled.

    The cache keeps whatever the teacher gave the first time it saw a sentence: entries written by an
    embedding-only run hold no hidden states, and caching every block's token states for 20k sentences
    would take gigabytes. With a hidden term the teacher therefore runs on every step.
    """
    cache = None if args.hidden_weight > 0 or args.no_cache else RESULTS / "minilm_teacher_cache.safetensors"
    return DistillConfig(
        output_loss=args.loss,
        alpha=1.0,
        hidden_weight=args.hidden_weight,
        hidden_loss=args.hidden_loss,
        cache=str(cache) if cache else None,
    )


def embedding_distill(student, teacher, tok, sentences, args, score=None) -> dict:
    """Train ``student`` towards the teacher's sentence embeddings (no labels); wall time and throughput.

    Each dataset item is a whole length-bucketed batch (the Trainer shuffles their order every epoch).
    ``score(model)``, if given, is reported after every epoch.
    """
    from slimkit.distill.api import no_label_loss, sentence_collate

    chunks = length_buckets(sentences, tok, args.batch_size)
    collate = sentence_collate(tok, 128)
    cfg = distill_config(args)
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=1,  # one bucket of args.batch_size sentences per step
        optimizer="adamw",
        lr=args.lr,
        schedule="cosine",
        warmup_steps=min(100, len(chunks) // 4) if args.warmup is None else args.warmup,
        seed=0,
        progress=args.progress,
    )
    RESULTS.mkdir(exist_ok=True)
    # A cache left by an earlier run means the teacher never runs here: say so, as it changes the wall time.
    prefilled = cfg.cache is not None and Path(cfg.cache).exists()
    budget = TimeBudget(args.budget_min * 60)
    start = time.perf_counter()
    result = distill_(
        student,
        teacher,
        chunks,
        cfg,
        train,
        loss_fn=no_label_loss,
        collate_fn=lambda items: collate([s for chunk in items for s in chunk]),
        callbacks=[budget, *([EpochScores(score)] if score else [])],
    ).train
    wall = time.perf_counter() - start
    seen = result.samples_per_s * result.train_time_s  # samples the loop trained on
    return {
        "wall_s": wall,
        "samples_per_s": seen / wall,
        "train_loop_samples_per_s": result.samples_per_s,
        "sentences": len(sentences),
        "epochs": args.epochs,
        "steps": result.steps,
        "warmup_steps": train.warmup_steps,
        "teacher_cache": cfg.cache is not None,
        "teacher_cache_from_earlier_run": prefilled,
        "stopped_by_time_budget": budget.hit,
        "history": result.history,
    }


def time_models(models: dict[str, torch.nn.Module], batch: dict, repeats: int) -> dict[str, float]:
    from slimkit.metrics import compare_latency

    fns = {name: (lambda m=m: m(**batch)) for name, m in models.items()}
    comparison = compare_latency(fns, warmup=2, repeats=repeats, threads=2, batch_size=64)
    return {name: comparison[name].median_ms for name in models}


def minilm(args) -> dict:
    from slimkit.distill import layer_dropped_student
    from slimkit.models.hf import load_hf

    teacher, tok = load_hf("minilm")
    student = layer_dropped_student(teacher, every=2, start=args.start)
    score = sts_dev(args.data, tok)
    scores = {"teacher": score(teacher), "student_init": score(student)}
    print(
        f"  teacher {scores['teacher']:.2f}, student before distillation {scores['student_init']:.2f}",
        file=sys.stderr,
    )
    sentences = pick_sentences(args)
    run = embedding_distill(student, teacher, tok, sentences, args, score if args.eval_epochs else None)
    scores["student"] = score(student)
    ms = time_models({"teacher": teacher, "student": student}, latency_batch(args.data, tok), args.repeats)
    rows = [
        ["teacher all-MiniLM-L6-v2 (6 layers)", count_parameters(teacher), f"{scores['teacher']:.2f}", "100.0%",
         f"{ms['teacher']:.0f}", "1.00x"],
        [f"student 3 layers (teacher layers {list(range(args.start, 6, 2))}), no training",
         count_parameters(student), f"{scores['student_init']:.2f}",
         f"{100 * scores['student_init'] / scores['teacher']:.1f}%", "-", "-"],
        [f"student 3 layers, distilled ({losses_label(args)})", count_parameters(student),
         f"{scores['student']:.2f}", f"{100 * scores['student'] / scores['teacher']:.1f}%",
         f"{ms['student']:.0f}", f"{ms['teacher'] / ms['student']:.2f}x"],
    ]  # fmt: skip
    print("\nSTS-B dev Spearman x100; latency: median ms, batch 64 x 128 tokens, 2 threads, interleaved")
    print(table(["model", "params", "STS-B dev", "of teacher", "latency ms", "speedup"], rows))
    print(
        f"\ndistillation: {run['sentences']} unlabeled sentences x {run['epochs']} epochs, "
        f"{run['steps']} steps of {args.batch_size}, wall {run['wall_s'] / 60:.1f} min ({_teacher_note(run)}), "
        f"{run['samples_per_s']:.1f} samples/s, stopped by time budget: {run['stopped_by_time_budget']}"
    )
    return {"scores": scores, "latency_ms": ms, "run": run, "config": _config(args)}


def _teacher_note(run: dict) -> str:
    if not run["teacher_cache"]:
        return "teacher run on every step"
    if run.get("teacher_cache_from_earlier_run"):
        return "teacher outputs read from an earlier run's cache: the teacher did not run"
    return "teacher outputs cached in epoch 1"


def pruned_minilm(teacher, tok, root: str):
    """The pruning benchmark's MiniLM: 50% FFN neurons + 50% heads, 'output' importance, 256 STS-B train pairs."""
    from bench_prune_minilm import HEADLINE, calibration_sets, prune_minilm

    from slimkit.data.text import read_stsb_file

    train_rows = read_stsb_file(Path(root) / "stsb" / "sts-train.csv")
    sentences_b, pairs = calibration_sets(tok, train_rows, n_pairs=256)
    pruned, _, prune_s = prune_minilm(teacher, HEADLINE, sentences_b, pairs)
    return pruned, prune_s


def losses_label(args) -> str:
    parts = [] if args.loss == "none" else [f"{args.loss} on embeddings"]
    if args.hidden_weight > 0:
        parts.append(f"{args.hidden_weight:g} x {args.hidden_loss} on every block's hidden states")
    return " + ".join(parts)


def recover(args) -> dict:
    """The pruning benchmark's MiniLM (50% FFN neurons, 50% heads, 'output' importance) recovered by distillation."""
    import copy

    from slimkit.models.hf import load_hf

    teacher, tok = load_hf("minilm")
    pruned, prune_s = pruned_minilm(teacher, tok, args.data)  # on the CPU, as in the pruning benchmark
    teacher, pruned = teacher.to(args.device), pruned.to(args.device)
    score = sts_dev(args.data, tok, args.device)
    scores = {"teacher": score(teacher), "pruned": score(pruned)}
    print(f"  teacher {scores['teacher']:.2f}, pruned {scores['pruned']:.2f}", file=sys.stderr, flush=True)
    recovered = copy.deepcopy(pruned)
    sentences = pick_sentences(args)
    run = embedding_distill(recovered, teacher, tok, sentences, args, score if args.eval_epochs else None)
    scores["recovered"] = score(recovered)
    models = {"teacher": teacher, "pruned": pruned, "recovered": recovered}
    ms = time_models(models, latency_batch(args.data, tok), args.repeats) if args.device == "cpu" else None
    labels = {
        "teacher": "all-MiniLM-L6-v2 (teacher)",
        "pruned": "pruned 50% FFN + 50% heads, before recovery",
        "recovered": f"pruned, recovered by distillation ({losses_label(args)})",
    }
    rows = [
        [labels[k], count_parameters(m), f"{scores[k]:.2f}", f"{scores[k] - scores['teacher']:+.2f}",
         f"{ms[k]:.0f}" if ms else "-", f"{ms['teacher'] / ms[k]:.2f}x" if ms else "-"]
        for k, m in models.items()
    ]  # fmt: skip
    if ms:
        print("\nSTS-B dev Spearman x100; latency: median ms, batch 64 x 128 tokens, 2 threads, interleaved")
    else:
        print(f"\nSTS-B dev Spearman x100; latency not measured on {args.device} (it is a CPU figure)")
    print(table(["model", "params", "STS-B dev", "vs teacher", "latency ms", "speedup"], rows))
    print(
        f"\nrecovery on {args.device}: {run['sentences']} unlabeled sentences x {run['epochs']} epochs, "
        f"{run['steps']} steps, wall {run['wall_s'] / 60:.1f} min, {run['samples_per_s']:.1f} samples/s, "
        f"teacher cache: {run['teacher_cache']}, stopped by time budget: {run['stopped_by_time_budget']}; "
        f"pruning took {prune_s:.0f} s"
    )
    return {"scores": scores, "latency_ms": ms, "run": run, "prune_s": prune_s, "config": _config(args)}


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/distill_<name>.json)")
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("hinton", help="Hinton's MNIST teacher/student")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seeds", type=int, default=2)
    p.set_defaults(func=hinton)
    for name, fn in (("minilm", minilm), ("recover", recover)):
        p = sub.add_parser(name)
        p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--lr", type=float, default=1e-4)
        p.add_argument(
            "--loss", choices=("mse", "cosine", "none"), default="cosine", help="on the sentence embeddings"
        )
        p.add_argument(
            "--hidden-weight", type=float, default=0.0, help="weight of every block's hidden-state term"
        )
        p.add_argument("--hidden-loss", choices=("mse", "cosine"), default="mse")
        p.add_argument(
            "--start", type=int, default=1, help="first teacher layer kept (every other one after)"
        )
        p.add_argument("--repeats", type=int, default=15)
        p.add_argument("--progress", action="store_true")
        p.add_argument(
            "--budget-min", type=float, default=28.0, help="stop distilling after this many minutes"
        )
        p.add_argument("--max-sentences", type=int, default=None, help="use a seeded random subset")
        p.add_argument(
            "--extra-text", default=None, help="WikiText-format file under --data (e.g. wikitext2/valid.txt)"
        )
        p.add_argument("--max-extra", type=int, default=None, help="seeded subset of the extra sentences")
        p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(100, steps/4))")
        p.add_argument("--no-cache", action="store_true", help="run the teacher on every step")
        p.add_argument("--eval-epochs", action="store_true", help="score STS-B dev after every epoch")
        if name == "recover":
            p.add_argument("--device", default="cpu", help="cuda: train and score there (no latency)")
        p.set_defaults(func=fn)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    figures = args.func(args)
    save(args.bench, figures, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
