"""Quantization benchmark: MiniLM-L6 int8 runtimes side by side, and LeNet-5 static int8 / 4-bit QAT.

Part ``minilm`` (all rows in one process, 2 threads, latencies interleaved):
fp32 eager (baseline), bf16, PyTorch ``quantize_dynamic``, ONNX Runtime
``quantize_dynamic``, torchao int8 dynamic + ``torch.compile``, slimkit int8
(ONNX Runtime kernels), slimkit int8 (pure PyTorch, on the kernel slimkit's dispatch picks) and
slimkit mixed precision. Latency input: 64 sequences of exactly 128 real tokens
(STS-B dev text packed end to end, no padding, so no runtime can skip padded
positions). Quality: STS-B dev Spearman of mean-pooled embeddings (every
sentence padded to 128 tokens, batches of 64) and the mean cosine of each
row's embeddings to the fp32 ones. Calibration uses STS-B *train* sentences.

Part ``layers``: single Conv2d and Linear layers of ResNet-like and MiniLM shapes, fp32
against slimkit's PyTorch int8 path (static and per-tensor dynamic), interleaved, with the
SQNR of each int8 output against fp32 (random weights and inputs: a kernel benchmark).

Part ``cnn``: LeNet-5 trained on MNIST (8000 of the 10k test images; scored on
the other 2000), then static int8 (calibrated on training images) and QAT with
4-bit weights, both against the float accuracy.

    .venv/bin/python bench/bench_quant.py --data ../shared/data [--part minilm|layers|cnn|all]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from benchlib import log, state_bytes

from slimkit.data.text import read_stsb_file
from slimkit.export.onnx import OrtModule, export_onnx, to_onnxruntime, with_padding
from slimkit.metrics import compare_latency, spearman
from slimkit.models.hf import minilm_path
from slimkit.quant import Int8DynamicConfig, MixedPrecisionConfig, load_quantized, quantize_, save_quantized
from slimkit.quant.sensitivity import plot_sensitivity
from slimkit.utils import dispatch
from slimkit.utils.io import save_weights, write_json
from slimkit.utils.sysinfo import machine_line

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
    return model.eval(), tok


def packed_batch(tok, rows, n=64, length=128) -> dict[str, torch.Tensor]:
    """``n`` sequences of exactly ``length`` real tokens: consecutive sentences packed end to end."""
    text = " ".join(r["text"] + " " + r["text_pair"] for r in rows)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = length - 2
    if len(ids) < n * body:
        raise ValueError(f"not enough text for {n} x {length} tokens")
    seqs = [[tok.cls_token_id, *ids[i * body : (i + 1) * body], tok.sep_token_id] for i in range(n)]
    input_ids = torch.tensor(seqs)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": torch.zeros_like(input_ids),
    }


def sentence_batches(tok, sentences, batch=64, length=128) -> list[dict[str, torch.Tensor]]:
    """Fixed-shape batches (``batch`` x ``length``; the last one topped up with its own first sentence)."""
    out = []
    for i in range(0, len(sentences), batch):
        chunk = sentences[i : i + batch]
        chunk = chunk + [chunk[0]] * (batch - len(chunk))
        b = tok(chunk, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        out.append({k: b[k] for k in INPUTS})
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


def embed(run, batches, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = torch.cat([mean_pool(run(b), b["attention_mask"]) for b in batches])
    return out[:n]


def torch_runner(model):
    def run(b):
        return model(**b).last_hidden_state.float()

    return run


def build_peers(model, example, tmp: Path, rows: dict) -> None:
    """The reference runtimes; each entry: (runner, file bytes, notes)."""
    rows["fp32 eager"] = (torch_runner(model), save_weights(model, tmp / "fp32.safetensors"), "")
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    rows["bf16"] = (torch_runner(bf16), save_weights(bf16, tmp / "bf16.safetensors"), "")
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

    qd = ao_quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8).eval()
    rows["PyTorch quantize_dynamic"] = (torch_runner(qd), state_bytes(qd.state_dict()), "fbgemm/x86 engine")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export_onnx(model, with_padding(example, pad=16), tmp / "fp32.onnx")
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "ort_q.onnx"), weight_type=QuantType.QInt8)
    ort_q = OrtModule(tmp / "ort_q.onnx")
    rows["ORT quantize_dynamic"] = (lambda b: ort_q(**b), ort_q.file_size(), "per-tensor weights")
    rows["torchao int8 dyn + compile"] = _torchao_row(model, example)


def _torchao_row(model, example):
    import torch._inductor.config as inductor_config
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization import quantize_ as ao_quantize_

    inductor_config.freezing = True  # lets inductor pre-pack weights for its CPU int8 GEMM path
    ao = copy.deepcopy(model).eval()
    ao_quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    size = state_bytes(ao.state_dict())
    compiled = torch.compile(ao)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(**example)
    note = f"compile {time.perf_counter() - start:.0f} s"
    return (torch_runner(compiled), size, note)


def build_slimkit(model, example, calib, tmp: Path, args, rows: dict, info: dict) -> None:
    include = ["encoder.*", "embeddings.word_embeddings"]
    cfg = Int8DynamicConfig(activation_granularity="tensor", quantize_embeddings=True, include=include)
    q = copy.deepcopy(model).eval()
    quantize_(q, cfg)
    size = save_quantized(q, tmp / "slimkit_int8.safetensors")
    # Parameters x bits / 8 plus scales and float tensors: the payload; the rest is the file's header.
    info["slimkit_int8_payload_bytes"] = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    info["slimkit_int8_file_bytes"] = size
    info["reload_max_abs_diff"] = _reload_check(model, q, tmp / "slimkit_int8.safetensors", example)
    ort_int8 = to_onnxruntime(q, with_padding(example, pad=16), tmp / "slimkit_int8.onnx")
    info["slimkit_int8_onnx_bytes"] = ort_int8.file_size()
    rows["slimkit int8 (ORT kernels)"] = (lambda b: ort_int8(**b), size, "per-channel w, per-tensor act")
    # the kernel slimkit's dispatch picks for these layers (fbgemm where it exists)
    kernel = dispatch.int8_gemm(per_tensor_dynamic=True).kernel
    rows[f"slimkit int8 (PyTorch, {kernel})"] = (torch_runner(q), size, "pure PyTorch path")
    low = {"method": "int8_dynamic", "activation_granularity": "tensor"}
    mixed_cfg = MixedPrecisionConfig(
        low=low,
        include=include,
        quantize_embeddings=True,
        max_error=args.mixed_error,
        max_high_layers=args.mixed_layers,
    )
    mixed = copy.deepcopy(model).eval()
    start = time.perf_counter()
    summary = quantize_(mixed, mixed_cfg, calibration_data=calib)
    info["mixed_analysis_s"] = time.perf_counter() - start
    info["mixed_kept_float"] = summary.analysis["high"]
    info["mixed_trace"] = summary.analysis["trace"]
    info["sensitivity"] = summary.analysis["sensitivity"]
    plot = plot_sensitivity(summary.analysis, args.out.with_name("quant_sensitivity.png"))
    info["sensitivity_plot"] = str(plot)
    size = save_quantized(mixed, tmp / "slimkit_mixed.safetensors")
    ort_mixed = to_onnxruntime(mixed, with_padding(example, pad=16), tmp / "slimkit_mixed.onnx")
    kept = len(summary.analysis["high"])
    rows["slimkit mixed (ORT kernels)"] = (lambda b: ort_mixed(**b), size, f"{kept} layers kept fp32")


def _reload_check(model, quantized, path: Path, example) -> float:
    fresh = load_quantized(copy.deepcopy(model), path).eval()
    with torch.inference_mode():
        a = quantized(**example).last_hidden_state
        b = fresh(**example).last_hidden_state
    return float((a - b).abs().max())


def minilm(args) -> dict:
    torch.manual_seed(0)
    model, tok = load_minilm()
    stsb = Path(args.data) / "stsb"
    dev, train = read_stsb_file(stsb / "sts-dev.csv"), read_stsb_file(stsb / "sts-train.csv")
    example = packed_batch(tok, dev, args.batch, args.seq)
    calib_sents = [r["text"] for r in train[: args.calib]]
    calib = [{k: v[:16] for k, v in b.items()} for b in sentence_batches(tok, calib_sents, 16, args.seq)]
    sentences = sorted({s for r in dev for s in (r["text"], r["text_pair"])})
    index = {s: i for i, s in enumerate(sentences)}
    batches = sentence_batches(tok, sentences, args.batch, args.seq)
    gold = torch.tensor([r["score"] for r in dev])
    pairs = (
        torch.tensor([index[r["text"]] for r in dev]),
        torch.tensor([index[r["text_pair"]] for r in dev]),
    )
    rows: dict = {}
    info: dict = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        torch.set_num_threads(args.threads)
        base_before = embed(torch_runner(model), batches, len(sentences))
        build_peers(model, example, tmp, rows)
        build_slimkit(model, example, calib, tmp, args, rows, info)
        log("rows built; timing")
        fns = {name: (lambda run=run: run(example)) for name, (run, _, _) in rows.items()}
        lat = compare_latency(fns, warmup=2, repeats=args.repeats, threads=args.threads)
        results = {}
        for name, (run, size, note) in rows.items():
            log(f"STS-B: {name}")
            emb = base_before if name == "fp32 eager" else embed(run, batches, len(sentences))
            cos = float(torch.nn.functional.cosine_similarity(emb, base_before).mean())
            sim = torch.nn.functional.cosine_similarity(emb[pairs[0]], emb[pairs[1]])
            results[name] = {
                "latency_ms": lat[name].median_ms,
                "p95_ms": lat[name].p95_ms,
                "speedup": lat.speedups[name],
                "size_mb": size / 1e6,
                "cos_to_fp32": cos,
                "stsb_spearman": 100 * spearman(sim, gold),
                "note": note,
            }
        base_after = embed(torch_runner(model), batches, len(sentences))
        info["baseline_drift_max_abs"] = float((base_after - base_before).abs().max())
        info["baseline_training_flag"] = model.training
    return {"rows": results, "info": info}


def cnn(args) -> dict:
    from slimkit.data import load_mnist
    from slimkit.metrics.task import evaluate
    from slimkit.models.builtin import LeNet5
    from slimkit.quant import Int8StaticConfig, QATCallback, QATConfig, calibrate, convert_, prepare_
    from slimkit.train.config import TrainConfig
    from slimkit.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    bundle = load_mnist(args.data, seed=0)
    loader = torch.utils.data.DataLoader(bundle.test, batch_size=256)

    def acc(m):
        return 100 * evaluate(m, loader, "classification")["accuracy"]

    model = LeNet5()
    Trainer(model, TrainConfig(epochs=args.cnn_epochs, lr=2e-3, seed=0, progress=False)).fit(bundle.train)
    model.eval()
    out = {"float": acc(model)}
    calib = [bundle.train[i][0].unsqueeze(0) for i in range(0, 512)]
    calib = [torch.cat(calib[i : i + 64]) for i in range(0, 512, 64)]
    static = copy.deepcopy(model)
    quantize_(static, Int8StaticConfig(), calibration_data=calib)
    out["static_int8"] = acc(static)
    ptq4 = copy.deepcopy(model)  # the same 4-bit grid without training: what QAT has to beat
    prepare_(ptq4, QATConfig(weight_bits=4, activation_bits=8))
    calibrate(ptq4, calib)
    convert_(ptq4)
    out["ptq_int4_weights"] = acc(ptq4)
    qat = copy.deepcopy(model).train()
    cfg = QATConfig(weight_bits=4, activation_bits=8)
    Trainer(
        qat,
        TrainConfig(epochs=args.qat_epochs, lr=5e-4, seed=1, progress=False),
        callbacks=[QATCallback(cfg)],
    ).fit(bundle.train)
    qat.eval()
    out["qat_fake_quant"] = acc(qat)
    convert_(qat)
    out["qat_int4_weights"] = acc(qat)
    with tempfile.TemporaryDirectory() as tmpdir:
        out["qat_file_bytes"] = save_quantized(qat, Path(tmpdir) / "lenet5_qat4.safetensors")
        out["float_file_bytes"] = save_weights(model, Path(tmpdir) / "lenet5.safetensors")
    return out


LAYERS = {  # name: (layer, input shape)
    "conv 3x3 64->64, 16x64x56x56": (lambda: torch.nn.Conv2d(64, 64, 3, padding=1), (16, 64, 56, 56)),
    "conv 3x3 128->128, 16x128x28x28": (lambda: torch.nn.Conv2d(128, 128, 3, padding=1), (16, 128, 28, 28)),
    "conv 3x3 256->256, 16x256x14x14": (lambda: torch.nn.Conv2d(256, 256, 3, padding=1), (16, 256, 14, 14)),
    "conv 1x1 64->256, 16x64x56x56": (lambda: torch.nn.Conv2d(64, 256, 1), (16, 64, 56, 56)),
    "linear 384->1536, 8192 rows": (lambda: torch.nn.Linear(384, 1536), (8192, 384)),
    "linear 1536->384, 8192 rows": (lambda: torch.nn.Linear(1536, 384), (8192, 1536)),
}


def layers(args) -> dict:
    """fp32 vs slimkit int8 (static, dynamic per tensor) on single layers, interleaved."""
    from slimkit.quant import Int8StaticConfig
    from slimkit.quant.affine import sqnr_db

    torch.manual_seed(0)
    out = {}
    for name, (build, shape) in LAYERS.items():
        x = torch.randn(*shape)
        fp32 = torch.nn.Sequential(build()).eval()
        static, dynamic = copy.deepcopy(fp32), copy.deepcopy(fp32)
        quantize_(static, Int8StaticConfig(), calibration_data=[x])
        quantize_(dynamic, Int8DynamicConfig(activation_granularity="tensor"))
        models = {"fp32": fp32, "int8 static": static, "int8 dynamic": dynamic}
        with torch.inference_mode():
            ref = fp32(x)
            sqnr = {k: float(sqnr_db(ref, m(x))) for k, m in models.items() if k != "fp32"}
            cmp = compare_latency(
                {k: (lambda m=m, x=x: m(x)) for k, m in models.items()},
                repeats=args.repeats,
                threads=args.threads,
            )
        out[name] = {
            "ms": {k: cmp[k].median_ms for k in models},
            "speedup": {k: cmp.speedups[k] for k in models if k != "fp32"},
            "sqnr_db": sqnr,
        }
        r = out[name]
        print(
            f"{name:34s} fp32 {r['ms']['fp32']:7.2f} ms | static {r['ms']['int8 static']:7.2f} ms "
            f"{r['speedup']['int8 static']:5.2f}x {sqnr['int8 static']:5.1f} dB | dynamic "
            f"{r['ms']['int8 dynamic']:7.2f} ms {r['speedup']['int8 dynamic']:5.2f}x {sqnr['int8 dynamic']:5.1f} dB"
        )
    return out


def print_minilm(res: dict) -> None:
    head = f"{'row':32s} {'latency ms':>10s} {'speedup':>8s} {'size MB':>8s} {'cos fp32':>9s} {'STS-B':>7s}  note"
    print(head)
    print("-" * len(head))
    for name, r in res["rows"].items():
        print(
            f"{name:32s} {r['latency_ms']:10.0f} {r['speedup']:7.2f}x {r['size_mb']:8.1f} "
            f"{r['cos_to_fp32']:9.4f} {r['stsb_spearman']:7.2f}  {r['note']}"
        )
    print({k: v for k, v in res["info"].items() if k not in ("sensitivity", "mixed_trace")})
    print(machine_line())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--part", choices=("minilm", "layers", "cnn", "all"), default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--calib", type=int, default=32, help="STS-B train sentences for mixed-precision analysis")
    p.add_argument("--mixed-error", type=float, default=0.02, help="relative output error budget")
    p.add_argument("--mixed-layers", type=int, default=4, help="at most this many layers kept in fp32")
    p.add_argument("--cnn-epochs", type=int, default=4)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["machine_before"] = machine_line()
    if args.part in ("minilm", "all"):
        result["minilm"] = minilm(args)
        print_minilm(result["minilm"])
    if args.part in ("layers", "all"):
        result["layers"] = layers(args)
    if args.part in ("cnn", "all"):
        result["cnn"] = cnn(args)
        print("LeNet-5 MNIST accuracy (%):", json.dumps(result["cnn"]))
    result["machine_after"] = machine_line()
    write_json(args.out, result)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
