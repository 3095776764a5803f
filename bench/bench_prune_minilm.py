"""Benchmark 3 of bench_prune.py: structured pruning of all-MiniLM-L6-v2 (heads + FFN neurons).

Calibration uses STS-B *train* sentences only; STS-B dev is only ever scored.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from slimkit.data.text import read_stsb_file
from slimkit.metrics import compare_latency, count_macs, count_parameters, spearman
from slimkit.models.hf import load_hf
from slimkit.prune import StructuredConfig, prune_

CRITERIA = ("l2", "random", "activation", "apoz", "taylor", "output")
HEADLINE = "output"


def encode(model, tok, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings (the SentenceEncoder pools over the attention mask), length-sorted batches."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [None] * len(sentences)
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            b = tok(
                [sentences[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            for j, e in zip(idx, model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])):
                out[j] = e
    return torch.stack(out)


def sts_spearman(model, tok, rows: list[dict]) -> float:
    a = encode(model, tok, [r["text"] for r in rows])
    b = encode(model, tok, [r["text_pair"] for r in rows])
    cos = torch.nn.functional.cosine_similarity(a, b)
    return 100 * spearman(cos, torch.tensor([r["score"] for r in rows]))


def calibration_sets(tok, train: list[dict], n_pairs: int, seed: int = 0):
    """(sentence batches for activation criteria, pair batches with gold scores for Taylor)."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_pairs].tolist()
    sentences = sorted({s for i in pick for s in (train[i]["text"], train[i]["text_pair"])}, key=len)

    def batch(texts):
        b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    sentence_batches = [batch(sentences[i : i + 32]) for i in range(0, len(sentences), 32)]
    pair_batches = []
    for i in range(0, len(pick), 16):
        rows = [train[j] for j in pick[i : i + 16]]
        scores = torch.tensor([r["score"] / 5 for r in rows])
        pair_batches.append((batch([r["text"] for r in rows]), batch([r["text_pair"] for r in rows]), scores))
    return sentence_batches, pair_batches


def sts_loss(model, batch) -> torch.Tensor:
    """STS-B train regression loss: cosine of the two embeddings vs the gold score / 5."""
    a, b, target = batch
    cos = torch.nn.functional.cosine_similarity(model(**a), model(**b))
    return torch.nn.functional.mse_loss(cos, target)


def prune_minilm(model, criterion: str, sentences, pairs):
    pruned = copy.deepcopy(model)
    cfg = StructuredConfig(ratio=0.5, head_ratio=0.5, importance=criterion, calibration_batches=16)
    start = time.perf_counter()
    if criterion == "taylor":
        summary = prune_(
            pruned, cfg, calibration=pairs, example_inputs=sentences[0], loss_fn=sts_loss,
            forward=lambda m, b: m(**b[0]) if isinstance(b, tuple) else m(**b),
        )  # fmt: skip
    else:
        summary = prune_(pruned, cfg, calibration=sentences if cfg.needs_calibration else None,
                         example_inputs=sentences[0])  # fmt: skip
    return pruned, summary, time.perf_counter() - start


def expected_cost(config, batch: int, seq: int, keep: float) -> tuple[int, int]:
    """Analytic parameters and MACs of BERT with ``keep`` of the heads and FFN neurons in every layer."""
    h, n, f, layers = (
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.num_hidden_layers,
    )
    hd = h // n
    a, ff = round(n * keep) * hd, round(f * keep)
    per_layer = 3 * (h * a + a) + (a * h + h) + (h * ff + ff) + (ff * h + h) + 4 * h  # + 2 LayerNorms
    emb = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    params = emb + layers * per_layer + h * h + h  # + pooler
    tokens = batch * seq
    macs = (
        layers * (tokens * (4 * h * a + 2 * h * ff) + 2 * batch * (a // hd) * seq * seq * hd) + batch * h * h
    )
    return params, macs


def forward_shapes_ok(model) -> list[str]:
    shapes = [(1, 1), (3, 17), (64, 128), (2, 512)]
    done = []
    with torch.inference_mode():
        for b, s in shapes:
            ids = torch.randint(1000, 20000, (b, s))
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            assert out.shape == (b, 384), (b, s, out.shape)
            done.append(f"{b}x{s}")
    return done


def latency_runs(dense, pruned, x: dict, args) -> list:
    """Several interleaved comparisons (the CPU is shared: one run can be unlucky)."""
    fns = {"unpruned": lambda: dense(**x), "pruned": lambda: pruned(**x)}
    count = args.latency_runs or (2 if args.quick else 3)
    return [compare_latency(fns, warmup=2, repeats=args.lm_repeats, threads=2) for _ in range(count)]


def compare_criteria(dense, tok, dev, criteria, sentences, pairs):
    """Prune a copy per criterion; STS-B dev Spearman of each (and of the unpruned model)."""
    scores = {"unpruned": sts_spearman(dense, tok, dev)}
    models, timings, summaries = {}, {}, {}
    for c in criteria:
        models[c], summaries[c], timings[c] = prune_minilm(dense, c, sentences, pairs)
        scores[c] = sts_spearman(models[c], tok, dev)
        print(f"  {c}: STS-B dev {scores[c]:.2f} (pruned in {timings[c]:.0f} s)", flush=True)
    return scores, models, timings, summaries


def bench_minilm(args, out: dict) -> str:
    from bench_prune import table  # the shared table printer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = Path(args.data) / "stsb"
    dev, train = read_stsb_file(data / "sts-dev.csv"), read_stsb_file(data / "sts-train.csv")
    dense, tok = load_hf("minilm")
    sentences, pairs = calibration_sets(tok, train, n_pairs=128 if args.quick else 256)
    criteria = args.criteria or (("l2", HEADLINE) if args.quick else CRITERIA)
    if HEADLINE not in criteria:
        criteria = [*criteria, HEADLINE]
    scores, models, timings, summaries = compare_criteria(dense, tok, dev, criteria, sentences, pairs)
    pruned = models[HEADLINE]
    x = {
        "input_ids": torch.randint(1000, 20000, (64, 128)),
        "attention_mask": torch.ones(64, 128, dtype=torch.long),
    }
    cost = {
        name: (count_parameters(m), count_macs(m, x)) for name, m in (("unpruned", dense), ("pruned", pruned))
    }
    expected = {"unpruned": expected_cost(dense.encoder.config, 64, 128, 1.0),
                "pruned": expected_cost(dense.encoder.config, 64, 128, 0.5)}  # fmt: skip
    shapes = forward_shapes_ok(pruned)
    runs = latency_runs(dense, pruned, x, args)
    speedups = [r.speedups["pruned"] for r in runs]
    out["minilm"] = {
        "sts_dev_spearman": scores, "prune_seconds": timings, "params": cost, "expected": expected,
        "forward_shapes": shapes, "latency": [r.to_dict() for r in runs], "speedups": speedups,
        "widths": summaries[HEADLINE].groups,
    }  # fmt: skip
    rows = [[name, f"{cost[name][0]:,}", f"{cost[name][1] / 1e9:.2f}", str(cost[name] == expected[name]),
             f"{sorted(r[name].median_ms for r in runs)[len(runs) // 2]:.0f}",
             f"{sorted(r.speedups[name] for r in runs)[len(runs) // 2]:.2f}x"] for name in ("unpruned", "pruned")]  # fmt: skip
    header = ["model", "params", "GMACs (64x128)", "as expected", "latency ms (64x128, 2 thr)", "speedup"]
    text = table(
        "all-MiniLM-L6-v2: 50% heads + 50% FFN neurons removed per layer (hidden size kept)", header, rows
    )
    crit_rows = [[c, scores[c], f"{timings.get(c, 0):.0f}"] for c in scores]
    text += "\n\n" + table("STS-B dev Spearman x100, right after pruning (no recovery training)",
                           ["importance", "Spearman", "prune time s"], crit_rows)  # fmt: skip
    text += f"\nlatency runs (speedup per run): {', '.join(f'{s:.2f}x' for s in speedups)}; forward ok for {shapes}"
    return text
