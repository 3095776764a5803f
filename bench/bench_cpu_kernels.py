"""The kernels slimkit chooses by processor, side by side: MiniLM on STS-B, and weight-only layers.

Part ``minilm`` (2 threads, latencies interleaved on 64 x 128 real tokens, STS-B dev Spearman x100):
fp32 eager; bf16 as slimkit runs it (``BF16Config``) and as plain bf16 GEMMs; PyTorch's
``quantize_dynamic``; slimkit int8 inside PyTorch, per-tensor and per-token activations, on the
kernel :mod:`slimkit.utils.dispatch` picks for this CPU (with AVX-512 VNNI: fbgemm per tensor,
oneDNN ``torch._int_mm`` per token; without: fbgemm with 7-bit activations); slimkit int8 on ONNX Runtime with each weight form
(``u8s8`` as written; ``reduce_range`` and ``u8u8``, the mitigations for CPUs without VNNI).

Part ``layers``: one 576 -> 1536 Linear (SmolLM2's FFN shape) at one token and at 128 rows: float32
against the int8 and int4 weight-only kernels computing in bf16 and in float32.

``--emulate avx2`` runs the benchmark again in a process where every PyTorch library runs its
AVX2 code (:data:`slimkit.utils.cpu.EMULATE_AVX2`: ATen, MKL, oneDNN, fbgemm), as on an AVX2-only
CPU; slimkit then chooses its kernels as it would there. ONNX Runtime has no such cap: its rows
still use this CPU's instructions.

    .venv/bin/python bench/bench_cpu_kernels.py --data ../shared/data [--part minilm|layers|all] [--emulate avx2]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
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
from slimkit.quant import BF16Config, Int8DynamicConfig, quantize_
from slimkit.utils import cpu, dispatch
from slimkit.utils.io import write_json
from slimkit.utils.sysinfo import machine_line


def emulate(kind: str | None) -> None:
    """Run this script again with the AVX2 caps set (they must be set before PyTorch starts)."""
    if kind is None or all(os.environ.get(k) == v for k, v in cpu.EMULATE_AVX2.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **cpu.EMULATE_AVX2})


def quantized(model, config):
    q = copy.deepcopy(model).eval()
    quantize_(q, config)
    return q


def ort_rows(q, example, tmp: Path) -> dict:
    base = tmp / "u8s8.onnx"
    export_onnx(q, with_padding(example, pad=16), base)
    share_input_quantization(base)
    rows = {}
    for mode in ("u8s8", "reduce_range", "u8u8"):
        path = tmp / f"{mode}.onnx"
        path.write_bytes(base.read_bytes())
        adapt_int8_weights(path, mode)
        ort = OrtModule(path)
        rows[f"slimkit int8 ORT {mode}"] = (lambda b, ort=ort: ort(**b), True)
    return rows


def build_rows(model, example, tmp: Path) -> dict:
    """``name -> (runner, scored)``: the runner maps a batch to the last hidden state."""
    from torch.ao.quantization import quantize_dynamic

    bf16 = dispatch.bf16_compute().kernel
    rows = {"fp32 eager": (torch_runner(model), True)}
    rows[f"slimkit bf16 ({bf16} GEMMs)"] = (torch_runner(quantized(model, BF16Config())), True)
    if bf16 != "bf16":  # what slimkit avoids here: timed, not scored (minutes at this speed)
        rows["plain bf16 GEMMs"] = (torch_runner(copy.deepcopy(model).to(torch.bfloat16)), False)
    qd = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8).eval()
    rows["PyTorch quantize_dynamic"] = (torch_runner(qd), True)
    for granularity in ("tensor", "token"):
        config = Int8DynamicConfig(
            activation_granularity=granularity,
            quantize_embeddings=True,
            include=["encoder.*", "embeddings.*"],
        )
        q = quantized(model, config)
        gemm = dispatch.int8_gemm(per_tensor_dynamic=granularity == "tensor").kernel
        rows[f"slimkit int8 per {granularity} ({gemm})"] = (torch_runner(q), True)
        if granularity == "tensor":
            rows.update(ort_rows(q, example, tmp))
    return rows


def minilm(args) -> dict:
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
    out = {"rows": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        rows = build_rows(model, example, Path(tmpdir))
        log(f"timing {len(rows)} rows, {args.repeats} interleaved rounds")
        lat = compare_latency(
            {n: (lambda r=r: r(example)) for n, (r, _) in rows.items()}, 2, args.repeats, args.threads
        )
        for name, (runner, scored) in rows.items():
            row = {"latency_ms": lat[name].median_ms, "speedup": lat.speedups[name], "stsb": None}
            if scored:
                log(f"STS-B: {name}")
                emb = embed(runner, batches, len(sentences))
                row["stsb"] = 100 * spearman(
                    torch.nn.functional.cosine_similarity(emb[left], emb[right]), gold
                )
            out["rows"][name] = row
    return out


def layers(args) -> dict:
    """Weight-only kernels against a float32 Linear at one token and 128 rows (random weights)."""
    torch.manual_seed(0)
    k, n, group = 576, 1536, 64
    weight = torch.randn(n, k)
    q8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    table = torch.stack([torch.rand(k // group, n) / 100, torch.zeros(k // group, n)], -1).contiguous()
    out = {}
    for rows in (1, 128):
        x = torch.randn(rows, k)
        fns = {"fp32 Linear": lambda x=x: torch.nn.functional.linear(x, weight)}
        for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            xd, s8d, td = x.to(dt), s8.to(dt), table.to(dt)
            fns[f"int8 weight-only in {name}"] = lambda xd=xd, s=s8d: torch.ops.aten._weight_int8pack_mm(
                xd, q8, s
            )
            fns[f"int4 g{group} in {name}"] = lambda xd=xd, t=td: torch.ops.aten._weight_int4pack_mm_for_cpu(
                xd, packed, group, t
            )
        lat = compare_latency(fns, 3, args.repeats * 4, args.threads, number=5 if rows == 1 else 1)
        out[f"{rows} rows"] = {
            name: {"ms": lat[name].median_ms, "speedup": lat.speedups[name]} for name in fns
        }
    out["chosen"] = {c.path: c.line() for c in (dispatch.int8_weight_only(), dispatch.int4_compute())}
    return out


def print_results(res: dict) -> None:
    print(res["machine_before"])
    if "minilm" in res:
        print("| row | latency ms (64 x 128) | x fp32 | STS-B dev |")
        print("|---|---:|---:|---:|")
        for name, r in res["minilm"]["rows"].items():
            stsb = "not scored" if r["stsb"] is None else f"{r['stsb']:.2f}"
            print(f"| {name} | {r['latency_ms']:.0f} | {r['speedup']:.2f} | {stsb} |")
    if "layers" in res:
        timed = {k: v for k, v in res["layers"].items() if k != "chosen"}
        names = list(next(iter(timed.values())))
        print("| 576 -> 1536 | " + " | ".join(f"{r} ms (x fp32)" for r in timed) + " |")
        print("|---|" + "---:|" * len(timed))
        for name in names:
            cells = [f"{timed[r][name]['ms']:.3f} ({timed[r][name]['speedup']:.2f}x)" for r in timed]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for line in res["layers"]["chosen"].values():
            print(f"chosen: {line}")
    print(res["machine_after"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--part", choices=("minilm", "layers", "all"), default="all")
    p.add_argument("--emulate", choices=("avx2",), default=None, help="run every PyTorch library's AVX2 code")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    emulate(args.emulate)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = {"machine_before": machine_line(), "threads": args.threads, "emulated": args.emulate}
    res["kernels"] = [c.line() for c in dispatch.kernel_table()]
    torch.set_num_threads(args.threads)
    for part, fn in (("layers", layers), ("minilm", minilm)):
        if args.part in (part, "all"):
            res[part] = fn(args)
    res["machine_after"] = machine_line()
    print_results(res)
    suffix = f"_{args.emulate}" if args.emulate else ""
    write_json(args.out or ROOT / "bench" / "results" / f"cpu_kernels{suffix}.json", res)


if __name__ == "__main__":
    main()
