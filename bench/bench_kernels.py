"""One MiniLM-sized Linear (8192 x 384 tokens, 384 -> 1536) on every kernel slimkit may choose.

Rows: fp32, slimkit int8 (dynamic per token / per tensor, static) on each int8 kernel
(oneDNN ``torch._int_mm``, fbgemm, fp32 on the dequantized weights), PyTorch's own
``quantize_dynamic`` Linear, bf16 and the weight-only kernels; with oneDNN enabled and
disabled (``torch.backends.mkldnn.enabled = False`` sends ``torch._int_mm`` to its
reference kernel, as on a CPU without AVX-512 VNNI). Each row also gives the relative
error against the fp32 output and the largest difference from slimkit's oneDNN output.

    .venv/bin/python bench/bench_kernels.py --threads 2
    # an AVX2-only CPU, approximately (set before torch loads):
    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from contextlib import contextmanager

import torch
from torch import nn

from slimkit.quant import Int8DynamicConfig, Int8StaticConfig, WeightOnlyConfig, quantize_
from slimkit.quant.config import BF16Config
from slimkit.utils import dispatch
from slimkit.utils.sysinfo import machine_line


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


@contextmanager
def setting(mkldnn: bool, kernel: str | None):
    saved, before = torch.backends.mkldnn.enabled, os.environ.get(dispatch.INT8_ENV)
    torch.backends.mkldnn.enabled = mkldnn
    if kernel:
        os.environ[dispatch.INT8_ENV] = kernel
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved
        os.environ.pop(dispatch.INT8_ENV, None)
        if before is not None:
            os.environ[dispatch.INT8_ENV] = before


def models(linear: nn.Linear, x: torch.Tensor) -> dict[str, nn.Module]:
    def quantized(config, data=None):
        m = nn.Sequential(copy.deepcopy(linear))
        quantize_(m, config, calibration_data=data)
        return m

    return {
        "fp32": linear,
        "int8 dynamic token": quantized(Int8DynamicConfig()),
        "int8 dynamic tensor": quantized(Int8DynamicConfig(activation_granularity="tensor")),
        "int8 static": quantized(Int8StaticConfig(), [x[:1024]]),
        "torch quantize_dynamic": torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}),
        "bf16": quantized(BF16Config()),
        "int8 weight-only": quantized(WeightOnlyConfig(bits=8)),
    }


CASES = [  # (oneDNN enabled, forced int8 kernel or None: the dispatch's own choice)
    (True, None),
    (True, "fbgemm"),
    (True, "fp32"),
    (False, None),
    (False, "onednn"),
]


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    linear = nn.Linear(384, 1536)
    x = torch.randn(args.rows, 384)
    with torch.inference_mode():
        ref, mods = linear(x), models(linear, x)
        rows, onednn = [], {}
        for mkldnn, kernel in CASES:
            with setting(mkldnn, kernel):
                chosen = dispatch.int8_gemm().kernel
                for name, mod in mods.items():
                    int8 = name.startswith(("int8 dynamic", "int8 static"))
                    if name != "fp32" and not int8 and (mkldnn, kernel) != (True, None):
                        continue  # the other rows do not depend on the int8 kernel
                    slow = chosen == "onednn" and not mkldnn
                    out = mod(x)
                    ms = median_ms(lambda m=mod: m(x), 1 if slow else args.repeats)
                    if int8 and chosen == "onednn" and mkldnn:
                        onednn[name] = out
                    diff = (out - onednn[name]).abs().max().item() if name in onednn else None
                    rows.append({
                        "case": CASES.index((mkldnn, kernel)), "oneDNN": mkldnn, "int8 kernel": chosen if int8 else "-",
                        "path": name, "ms": ms,
                        "rel_err": ((out - ref).norm() / ref.norm()).item(),
                        "max_diff_vs_onednn": diff,
                    })  # fmt: skip
    fp32 = {r["case"]: r["ms"] for r in rows if r["path"] == "fp32"}  # each case's own fp32 row
    for r in rows:
        r["vs_fp32"] = fp32[r["case"]] / r["ms"]
    return {"machine": machine_line(), "rows": args.rows, "threads": args.threads, "table": rows}


def weight_only_by_rows(args) -> list[dict]:
    """fp32 against the weight-only kernels as the number of rows grows (LLM decode is one row)."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536)
    mods = {"fp32": linear}
    for bits, group in ((8, None), (4, 32)):
        m = nn.Sequential(copy.deepcopy(linear))
        quantize_(m, WeightOnlyConfig(bits=bits, group_size=group))
        mods[f"int{bits} weight-only"] = m
        # the alternative for many rows: dequantize per call, then a float32 GEMM
        mods[f"int{bits} dequant + fp32"] = lambda x, q=m[0]: nn.functional.linear(x, q.weight(), q.bias())
    out = []
    with torch.inference_mode():
        for rows in (1, 16, 128, 1024):
            x = torch.randn(rows, 576)
            ms = {name: median_ms(lambda m=m, x=x: m(x), args.repeats * 3) for name, m in mods.items()}
            out.append({"rows": rows, "ms": ms})
    return out


def print_table(res: dict) -> None:
    print(f"one Linear 384 -> 1536 on {res['rows']} x 384 float32 inputs, {res['threads']} threads")
    print(res["machine"])
    print("| oneDNN | int8 kernel | path | ms | x fp32 | rel. error vs fp32 | max diff vs oneDNN int8 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in res["table"]:
        diff = "" if r["max_diff_vs_onednn"] is None else f"{r['max_diff_vs_onednn']:.2g}"
        print(
            f"| {'on' if r['oneDNN'] else 'off'} | {r['int8 kernel']} | {r['path']} | {r['ms']:.1f} "
            f"| {r['vs_fp32']:.2f} | {r['rel_err']:.4f} | {diff} |"
        )
    print("\nweight-only, 576 -> 1536 (ms; x fp32)")
    for r in res["weight_only"]:
        cells = ", ".join(f"{k} {v:.3f} ({r['ms']['fp32'] / v:.2f}x)" for k, v in r["ms"].items())
        print(f"  {r['rows']} rows: {cells}")
    print(machine_line())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    res = run(args)
    res["weight_only"] = weight_only_by_rows(args)
    print_table(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
