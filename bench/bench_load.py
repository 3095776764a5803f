"""Graceful under load: fp32 against slimkit int8 (PyTorch path), on a quiet machine and beside busy processes.

The model is all-MiniLM-L6-v2 (``slimkit.models.hf.minilm_path``) when transformers and
the weights are installed, else a MiniLM-sized stand-in (6 blocks, 384 wide, 1536 FFN,
12 heads, random weights). int8 is the shipped ``minilm_int8_onnxruntime`` recipe's
quantization (dynamic, per-tensor activations, int8 embedding table) run in PyTorch.
Input: ``--batch`` x ``--seq`` tokens. Latency: medians of interleaved rounds (fp32 and
int8 alternate, the order rotating each round), each phase bounded by ``--budget-s``.

Phase ``quiet``: nothing started beside. Phase ``loaded``: ``--busy`` processes spinning
``while True: pass`` (each stops itself after the phase's budget, and is killed when
the phase ends), started ``--settle-s`` seconds before timing.
Target (issue 12): the loaded int8/fp32 time ratio within 1.5x of the quiet one.
The int8 outputs of both phases are compared: the thread count must not change a bit.

    .venv/bin/python bench/bench_load.py [--repeats 7] [--busy 2] [--out bench/results/load.json]

To time other code (e.g. an older checkout) with this script:
``PYTHONPATH=/path/to/old/src .venv/bin/python bench/bench_load.py --label before``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import slimkit
from slimkit.quant import Int8DynamicConfig, quantize_
from slimkit.utils.io import write_json

ROOT = Path(__file__).resolve().parents[1]


class _Block(nn.Module):
    """A BERT layer's shape: attention (4 Linears + SDPA), LayerNorm, GELU FFN, LayerNorm."""

    def __init__(self, width: int = 384, ffn: int = 1536, heads: int = 12):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, ffn), nn.Linear(ffn, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = (
            p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value)
        )
        att = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, w)
        x = self.norm1(x + self.out(att))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class StandIn(nn.Module):
    """MiniLM-sized encoder without transformers: embeddings + 6 blocks."""

    def __init__(self, vocab: int = 30522, width: int = 384, layers: int = 6):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.encoder = nn.Sequential(*(_Block(width) for _ in range(layers)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.word_embeddings(input_ids))


def build_models(batch: int, seq: int) -> tuple[nn.Module, nn.Module, dict, str]:
    """fp32 model, its slimkit int8 copy, the input batch, and which model it is."""
    torch.manual_seed(0)
    with contextlib.suppress(ImportError):  # slimkit before issue 12 has no utils.quiet
        from slimkit.utils.quiet import hush_import_noise

        hush_import_noise()
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        from slimkit.models.hf import minilm_path

        path = minilm_path()
        model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
        include, name = ["encoder.*", "embeddings.word_embeddings"], f"all-MiniLM-L6-v2 ({path.name})"
    except Exception as err:  # no transformers / no weights: the stand-in has the same shapes
        model, include = StandIn(), ["encoder.*", "word_embeddings"]
        name = f"MiniLM-sized stand-in (random weights; {type(err).__name__})"
    model.eval()
    int8 = copy.deepcopy(model).eval()
    cfg = Int8DynamicConfig(activation_granularity="tensor", quantize_embeddings=True, include=include)
    quantize_(int8, cfg)
    ids = torch.randint(1000, 29000, (batch, seq))
    return model, int8, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, name


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def runnable_now() -> int | None:
    """The machine's runnable threads at this instant (``/proc/loadavg``, this process included)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def time_phase(models: dict[str, nn.Module], inputs: dict, repeats: int, budget_s: float) -> dict:
    """Interleaved rounds (one warm-up round first) until ``repeats`` rounds or the budget is spent."""
    names, samples, outputs, runnable = list(models), {n: [] for n in models}, {}, []
    start, load_start = time.perf_counter(), os.getloadavg()
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                outputs[name] = _output(models[name], inputs)
                if round_:
                    samples[name].append((time.perf_counter() - t0) * 1000)
                runnable.append(runnable_now())
            if round_ and time.perf_counter() - start > budget_s:
                break
    known = [r for r in runnable if r is not None]
    return {
        "rounds": len(samples[names[0]]),
        "runnable_median": statistics.median(known) if known else None,
        "ms": {n: statistics.median(s) if s else float("nan") for n, s in samples.items()},
        "samples_ms": samples,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "outputs": outputs,
    }


@contextlib.contextmanager
def busy_processes(count: int, limit_s: float):
    """``count`` processes spinning on a core each; each exits by itself after ``limit_s``."""
    code = f"import time\nend = time.time() + {limit_s:.0f}\nwhile time.time() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def cpu_description() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        model = next(
            (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), ""
        )
    except OSError:
        flags, model = [], ""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {
        "model": model,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in wanted if f in flags],
        "cores": os.cpu_count(),
    }


def _single_calls() -> int | None:
    """How many int8 layer calls ran single-threaded (None: this slimkit has no load adaptation)."""
    try:
        from slimkit.utils.cpu import PROBE
    except ImportError:
        return None
    return PROBE.single_calls


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    fp32, int8, inputs, model_name = build_models(args.batch, args.seq)
    models = {"fp32": fp32, "int8": int8}
    res = {
        "label": args.label,
        "slimkit": str(Path(slimkit.__file__).parent),
        "model": model_name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "batch": [args.batch, args.seq],
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "uptime_before": _uptime(),
        "phases": {},
    }
    before = _single_calls()
    res["phases"]["quiet"] = time_phase(models, inputs, args.repeats, args.budget_s)
    quiet_single = _single_calls()
    with busy_processes(args.busy, args.settle_s + args.budget_s + 600):
        time.sleep(args.settle_s)
        res["uptime_loaded"] = _uptime()
        res["phases"]["loaded"] = time_phase(models, inputs, args.repeats, args.budget_s)
    after = _single_calls()
    if before is not None:
        res["single_thread_calls"] = {"quiet": quiet_single - before, "loaded": after - quiet_single}
    res["uptime_after"] = _uptime()
    q, l8 = res["phases"]["quiet"].pop("outputs"), res["phases"]["loaded"].pop("outputs")
    res["int8_max_abs_diff_quiet_vs_loaded"] = float((q["int8"] - l8["int8"]).abs().max())
    for phase in res["phases"].values():
        phase["int8_over_fp32"] = phase["ms"]["int8"] / phase["ms"]["fp32"]
    res["loaded_ratio_over_quiet_ratio"] = (
        res["phases"]["loaded"]["int8_over_fp32"] / res["phases"]["quiet"]["int8_over_fp32"]
    )
    return res


def print_table(res: dict) -> None:
    cpu = res["cpu"]
    print(f"{res['label']}: slimkit from {res['slimkit']}; {res['model']}")
    print(
        f"{res['date']}; {res['threads']} threads; batch {res['batch'][0]} x {res['batch'][1]} tokens; "
        f"torch {res['torch']}"
    )
    print(f"CPU: {cpu['model']}; torch capability {cpu['torch_capability']}; flags {' '.join(cpu['flags'])}")
    print(f"uptime before: {res['uptime_before']}\nuptime loaded: {res['uptime_loaded']}")
    print("| phase | load avg (1 min) start -> end | runnable | rounds | fp32 ms | int8 ms | int8/fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, p in res["phases"].items():
        load = f"{p['loadavg_start'][0]:.2f} -> {p['loadavg_end'][0]:.2f}"
        print(
            f"| {name} | {load} | {p['runnable_median']} | {p['rounds']} | {p['ms']['fp32']:.0f} "
            f"| {p['ms']['int8']:.0f} | {p['int8_over_fp32']:.2f} |"
        )
    print("(runnable: median over the phase of the machine's runnable threads, this process included)")
    ratio = res["loaded_ratio_over_quiet_ratio"]
    verdict = "met" if ratio <= 1.5 else "NOT met"
    print(f"loaded ratio / quiet ratio: {ratio:.2f} (target <= 1.5: {verdict})")
    print(f"int8 output, quiet vs loaded: max abs difference {res['int8_max_abs_diff_quiet_vs_loaded']:.3g}")
    if "single_thread_calls" in res:
        print(f"int8 layer calls run single-threaded: {res['single_thread_calls']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per phase (at most)")
    p.add_argument("--busy", type=int, default=2, help="busy processes in the loaded phase")
    p.add_argument("--settle-s", type=float, default=3.0, help="seconds between starting them and timing")
    p.add_argument("--budget-s", type=float, default=240.0, help="a phase stops after this many seconds")
    p.add_argument("--label", default="slimkit")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = p.parse_args()
    res = run(args)
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
