"""Is there a CPU kernel in this torch that makes 50% or 2:4 sparse weights decode faster than dense?

At decode shapes (``M`` = 1 and 8 rows of activations, SmolLM2-135M's Linear shapes, fp32,
``--threads`` threads) it times ``y = x W^T``:

- ``dense``: ``F.linear`` (the baseline every pruned model runs today);
- ``csr64`` / ``csr32``: ``W.to_sparse_csr()`` with int64 / int32 indices, ``torch.sparse.mm(W, x^T)``
  (MKL sparse BLAS where torch has it);
- ``coo``: ``torch.sparse.mm`` on ``W.to_sparse()``;
- ``bsr``: ``W.to_sparse_bsr((4, 4))`` (blocks stay 50% dense for unstructured and 2:4, so it can
  only win on block-sparse weights; timed for completeness) where ``matmul`` supports it;
- ``semi``: ``torch.sparse.to_sparse_semi_structured`` (2:4 hardware format): tried, and its error
  recorded (CUDA-only).

Each entry: median over ``--repeats`` runs of ``--iters`` calls, after a warm-up; ratio = dense time /
its time (> 1 is faster than dense). Weights: random, pruned by magnitude to 50% or to 2:4.

    .venv/bin/python bench/bench_sparse_kernels.py [--threads 2] [--iters 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchlib import uptime

SHAPES = {"576x576 (q/o)": (576, 576), "576->1536 (gate/up)": (1536, 576), "1536->576 (down)": (576, 1536)}


def pruned(out_f: int, in_f: int, pattern: str) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    if pattern == "50%":
        cut = w.abs().flatten().kthvalue(w.numel() // 2).values
        return w.masked_fill(w.abs() <= cut, 0.0)
    groups = w.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    return w.masked_fill(~keep.reshape(w.shape), 0.0)


def kernels(w: torch.Tensor) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, str]]:
    """``{name: x -> x W^T}`` for every format this torch can build on CPU, and why the others cannot."""
    out: dict[str, Callable] = {"dense": lambda x: F.linear(x, w)}
    failed: dict[str, str] = {}
    csr = w.to_sparse_csr()
    out["csr64"] = lambda x: torch.sparse.mm(csr, x.t()).t()
    csr32 = torch.sparse_csr_tensor(
        csr.crow_indices().int(), csr.col_indices().int(), csr.values(), size=w.shape
    )
    out["csr32"] = lambda x: torch.sparse.mm(csr32, x.t()).t()
    coo = w.to_sparse().coalesce()
    out["coo"] = lambda x: torch.sparse.mm(coo, x.t()).t()
    try:
        bsr = w.to_sparse_bsr((4, 4))
        torch.matmul(bsr, torch.zeros(w.shape[1], 1))
        out["bsr"] = lambda x: torch.matmul(bsr, x.t()).t()
    except (RuntimeError, NotImplementedError) as err:
        failed["bsr"] = str(err).splitlines()[0][:120]
    try:
        from torch.sparse import to_sparse_semi_structured

        semi = to_sparse_semi_structured(w)
        out["semi"] = lambda x: F.linear(x, semi)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        failed["semi"] = str(err).splitlines()[0][:120]
    return out, failed


def seconds(fn: Callable, x: torch.Tensor, iters: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(max(5, iters // 10)):
            fn(x)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                fn(x)
            runs.append((time.perf_counter() - start) / iters)
    return statistics.median(runs)


def measure(args) -> tuple[list[dict], dict[str, str]]:
    rows, failures = [], {}
    for shape_name, (out_f, in_f) in SHAPES.items():
        for pattern in ("50%", "2:4"):
            w = pruned(out_f, in_f, pattern)
            fns, failed = kernels(w)
            failures.update(failed)
            for m in (1, 8):
                x = torch.randn(m, in_f)
                ref = fns["dense"](x)
                times = {}
                for name, fn in fns.items():
                    torch.testing.assert_close(fn(x), ref, rtol=1e-4, atol=1e-4)  # the same product
                    times[name] = seconds(fn, x, args.iters, args.repeats)
                rows.append({"shape": shape_name, "pattern": pattern, "m": m, "us": times})
    return rows, failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(beta state|invariant checks).*")  # torch's sparse notices
    from slimkit.utils.sysinfo import cpu_line

    before = uptime()
    rows, failures = measure(args)
    print(
        f"torch {torch.__version__} | CPU {cpu_line()} | {args.threads} threads | MKL {torch.backends.mkl.is_available()}"
    )
    print(f"load before: {before}\nload after:  {uptime()}")
    names = list(rows[0]["us"])
    print(
        f"{'shape':22s}{'pattern':>8s}{'M':>3s}{'dense us':>10s}"
        + "".join(f"{n + ' x':>10s}" for n in names[1:])
    )
    for r in rows:
        dense = r["us"]["dense"]
        ratios = "".join(f"{dense / r['us'][n]:>9.2f}x" for n in names[1:])
        print(f"{r['shape']:22s}{r['pattern']:>8s}{r['m']:>3d}{1e6 * dense:>10.1f}{ratios}")
    for name, why in failures.items():
        print(f"{name}: not available on CPU: {why}")


if __name__ == "__main__":
    main()
