"""MiniLM on STS-B with each kernel slimkit chooses by processor: accuracy and speed side by side.

Rows: fp32 eager, PyTorch ``quantize_dynamic`` (fbgemm), slimkit int8 inside PyTorch on oneDNN
(``torch._int_mm``, this VNNI machine's choice) and on fbgemm as an AVX2-only CPU gets it
(7-bit activations: the capability is faked to ``avx2``), and slimkit int8 on ONNX Runtime with
each weight form (``u8s8`` as written, ``reduce_range`` and ``u8u8``, the mitigations for CPUs
without VNNI). STS-B dev Spearman x100 and latency on 64 x 128 tokens (interleaved, 2 threads).

    .venv/bin/python bench/bench_cpu_kernels.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_quant import ROOT, embed, load_minilm, log, packed_batch, sentence_batches, torch_runner

from slimkit.data.text import read_stsb_file
from slimkit.export.onnx import (
    OrtModule,
    adapt_int8_weights,
    export_onnx,
    share_input_quantization,
    with_padding,
)
from slimkit.metrics import compare_latency, spearman
from slimkit.quant import Int8DynamicConfig, quantize_
from slimkit.utils import cpu
from slimkit.utils.io import write_json
from slimkit.utils.sysinfo import machine_line


@contextmanager
def avx2_dispatch():
    """slimkit's kernel table sees an AVX2-only CPU (the kernels themselves run on this one)."""
    real = cpu.capability
    cpu.capability = lambda: {**real(), "flags": ["avx2"], "torch": "AVX2"}
    try:
        yield
    finally:
        cpu.capability = real


def as_avx2(run):
    def wrapped(b):
        with avx2_dispatch():
            return run(b)

    return wrapped


def build_rows(model, example, tmp: Path, granularity: str) -> dict:
    from torch.ao.quantization import quantize_dynamic

    rows = {"fp32 eager": torch_runner(model)}
    qd = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8).eval()
    rows["PyTorch quantize_dynamic"] = torch_runner(qd)
    cfg = Int8DynamicConfig(
        activation_granularity=granularity, quantize_embeddings=True, include=["encoder.*", "embeddings.*"]
    )
    q = copy.deepcopy(model).eval()
    quantize_(q, cfg)
    rows[f"slimkit int8 {granularity}, oneDNN"] = torch_runner(q)
    rows[f"slimkit int8 {granularity}, fbgemm 7-bit (AVX2 choice)"] = as_avx2(torch_runner(q))
    if granularity == "tensor":
        base = tmp / "u8s8.onnx"
        export_onnx(q, with_padding(example, pad=16), base)
        share_input_quantization(base)
        for mode in ("u8s8", "reduce_range", "u8u8"):
            path = tmp / f"{mode}.onnx"
            path.write_bytes(base.read_bytes())
            adapt_int8_weights(path, mode)
            ort = OrtModule(path)
            rows[f"slimkit int8 ORT {mode}"] = lambda b, ort=ort: ort(**b)
    return rows


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    dev = read_stsb_file(Path(args.data) / "stsb" / "sts-dev.csv")
    example = packed_batch(tok, dev, 64, 128)
    sentences = sorted({s for r in dev for s in (r["text"], r["text_pair"])})
    index = {s: i for i, s in enumerate(sentences)}
    batches = sentence_batches(tok, sentences, 64, 128)
    gold = torch.tensor([r["score"] for r in dev])
    left = torch.tensor([index[r["text"]] for r in dev])
    right = torch.tensor([index[r["text_pair"]] for r in dev])
    out = {"machine_before": machine_line(), "threads": args.threads, "rows": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        rows = build_rows(model, example, Path(tmpdir), "tensor")
        rows.update(
            {k: v for k, v in build_rows(model, example, Path(tmpdir), "token").items() if "token" in k}
        )
        lat = compare_latency(
            {n: (lambda r=r: r(example)) for n, r in rows.items()}, 2, args.repeats, args.threads
        )
        for name, runner in rows.items():
            log(f"STS-B: {name}")
            emb = embed(runner, batches, len(sentences))
            sim = torch.nn.functional.cosine_similarity(emb[left], emb[right])
            out["rows"][name] = {
                "latency_ms": lat[name].median_ms,
                "speedup": lat.speedups[name],
                "stsb": 100 * spearman(sim, gold),
            }
    out["machine_after"] = machine_line()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_kernels.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args)
    print(res["machine_before"])
    print("| row | latency ms (64 x 128) | x fp32 | STS-B dev |")
    print("|---|---:|---:|---:|")
    for name, r in res["rows"].items():
        print(f"| {name} | {r['latency_ms']:.0f} | {r['speedup']:.2f} | {r['stsb']:.2f} |")
    print(res["machine_after"])
    write_json(args.out, res)


if __name__ == "__main__":
    main()
