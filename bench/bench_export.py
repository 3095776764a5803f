"""ONNX Runtime export speed: the demo's int8 CNN (QDQ -> QLinearConv) and MatMulNBits at decode shapes.

1. CNN: the demo's int8 model as it reaches the quantize step (a width-16 DigitsCNN student,
   half its channels and neurons removed by structured pruning), static int8 calibrated on
   256 digits images; batch 64 (the demo's measure batch), 2 threads. Rows: PyTorch float,
   PyTorch int8 (slimkit's kernels), ONNX Runtime float, ONNX Runtime int8 (QDQ export).
2. Linear layers at decode shape (one token): float, slimkit's weight-only int4 (g64, g32) and
   int8 in PyTorch, and the same codes as ``MatMulNBits`` in ONNX Runtime with
   ``accuracy_level`` 0 (float math, the export's default) and 4 (int8 activations).

    .venv/bin/python bench/bench_export.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from functools import partial
from pathlib import Path

import torch
from bench_kernels import median_ms
from torch import nn

import slimkit.export.nbits as nbits
from slimkit import prune, quant
from slimkit.export.onnx import export_onnx, ort_session, to_onnxruntime
from slimkit.models import DigitsCNN


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after a warm-up (sessions and caches settle in the first calls)."""
    for _ in range(max(5, repeats // 10)):
        fn()
    return median_ms(fn, repeats) / 1e3


def demo_cnn(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN(width=16).eval()
    prune.prune_(model, prune.StructuredConfig(ratio=0.5, importance="l1"), example_inputs=x[:8])
    return model


def bench_cnn(repeats: int, folder: Path) -> None:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    x = images[:64]
    fp32 = demo_cnn(x)
    int8 = copy.deepcopy(fp32)
    quant.quantize_(
        int8, quant.Int8StaticConfig(), calibration_data=[images[i : i + 64] for i in range(0, 256, 64)]
    )
    ort_fp32 = to_onnxruntime(fp32, {"x": x}, folder / "fp32.onnx")
    ort_int8 = to_onnxruntime(int8, {"x": x}, folder / "int8.onnx")
    with torch.no_grad():
        ref = int8(x)
        rows = {
            "pytorch fp32": _time(lambda: fp32(x), repeats),
            "pytorch int8": _time(lambda: int8(x), repeats),
            "onnxruntime fp32": _time(lambda: ort_fp32(x=x), repeats),
            "onnxruntime int8 (QDQ)": _time(lambda: ort_int8(x=x), repeats),
        }
    err = float((ort_int8(x=x) - ref).norm() / ref.norm())
    agree = float((ort_int8(x=x).argmax(1) == ref.argmax(1)).float().mean())
    base = rows["pytorch fp32"]
    print(
        f"demo int8 CNN, batch 64: ORT int8 vs PyTorch int8 rel. error {err:.4f}, top-1 agreement {agree:.3f}"
    )
    for name, t in rows.items():
        print(f"  {name:24s} {t * 1e3:7.3f} ms  {base / t:5.2f}x PyTorch fp32")
    print(f"  ORT int8 vs ORT fp32: {rows['onnxruntime fp32'] / rows['onnxruntime int8 (QDQ)']:.2f}x")


def bench_nbits(repeats: int, folder: Path) -> None:
    for k, n in [(576, 1536), (2048, 8192)]:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(k, n, bias=False)).eval()
        x = torch.randn(1, 1, k)
        feed = {"input": x.numpy()}
        export_onnx(base, {"input": x}, folder / "f.onnx")
        session = ort_session(folder / "f.onnx")
        with torch.no_grad():
            line = f"K={k} N={n} one token: torch fp32 {_time(partial(base, x), repeats) * 1e6:.0f} us"
        line += f", ORT fp32 MatMul {_time(partial(session.run, None, feed), repeats) * 1e6:.0f} us"
        print(line)
        for config in (quant.WeightOnlyConfig(bits=4, group_size=64), quant.WeightOnlyConfig(bits=4, group_size=32),
                       quant.WeightOnlyConfig(bits=8)):  # fmt: skip
            model = copy.deepcopy(base)
            quant.quantize_(model, config)
            with torch.no_grad():
                row = f"  int{config.bits} g{config.group_size}: torch {_time(partial(model, x), repeats) * 1e6:.0f} us"
            for level in (0, 4):
                path = folder / f"q{level}.onnx"
                with _accuracy_level(level):
                    export_onnx(model, {"input": x}, path)
                session = ort_session(path)
                row += f", MatMulNBits acc{level} {_time(partial(session.run, None, feed), repeats) * 1e6:.0f} us"
            print(row)


class _accuracy_level:
    """MatMulNBits' accuracy_level for the exports inside (the default is float math)."""

    def __init__(self, level: int):
        self.level = level

    def __enter__(self):
        self.saved, nbits.DEFAULT_ACCURACY_LEVEL = nbits.DEFAULT_ACCURACY_LEVEL, self.level

    def __exit__(self, *exc):
        nbits.DEFAULT_ACCURACY_LEVEL = self.saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--only", choices=("cnn", "nbits"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "cnn"):
            bench_cnn(args.repeats, Path(tmp))
        if args.only in (None, "nbits"):
            bench_nbits(args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
