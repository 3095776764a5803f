"""Deep-Compression storage on MNIST: pruning, weight sharing, entropy coding (Han et al. 2016).

For LeNet-300-100 and LeNet-5 (Caffe's 20-50-500-10, Han et al.'s model), each row of
the pipeline against the dense model of the same run:

1. dense: trained with Adam (as bench_prune.py), saved as fp32 safetensors (``save_weights``);
2. pruned: global magnitude pruning on Zhu & Gupta's cubic schedule during fine-tuning
   (bench_prune.py's pipeline), saved by ``save_sparse`` (bitmask + fp32 values);
3. + shared weights: ``codebook`` quantization (k-means, linear init, only non-zeros),
   centroids fine-tuned in the Trainer, saved by ``save_compressed`` with the coders
   limited to raw / b-bit packing (b-bit indices, gaps as LEB128 bytes, fp32 codebooks);
4. + entropy coding: the same model, ``save_compressed`` choosing per tensor the smallest
   of raw, bitpack, Huffman, zlib, bz2, lzma;
5. + int8 activations: the same fine-tuned codebooks converted as ``activation_bits: 8`` would
   (int8 codebook, one scale per layer; dynamic per-tensor int8 activations on slimkit's int8
   GEMM), entropy-coded like row 4.

Bytes are whole files as written (header, JSON layer table, codebooks, biases, indices,
positions); the ratio is the dense fp32 safetensors file over the row's file. Every
compressed file is reloaded into a freshly built model and checked bit for bit.

    .venv/bin/python bench/bench_storage.py --data ../shared/data [--quick] [--only lenet300 lenet5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from slimkit.data import load_mnist
from slimkit.models.builtin import LeNet300100
from slimkit.prune import GradualConfig, GradualPruningCallback, finalize_, load_sparse, save_sparse
from slimkit.quant import CodebookConfig, convert_, load_compressed, quantize_, save_compressed
from slimkit.quant.codebook import CodebookConv2d, SharedWeights
from slimkit.utils.io import save_weights, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import fit, run_record, table, test_accuracy  # noqa: E402  (the pruning benchmark's helpers)

ROOT = Path(__file__).resolve().parents[1]


class CaffeLeNet5(nn.Module):
    """Caffe's LeNet-5 as in Han et al.: conv 20 -> pool -> conv 50 -> pool -> fc 500 -> fc 10 (431k weights)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2)
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = {"lenet300": ("LeNet-300-100", LeNet300100), "lenet5": ("LeNet-5 (Caffe 20-50-500-10)", CaffeLeNet5)}


def prune_gradually(dense, train, sparsity: float, epochs: int):
    """bench_prune.py's schedule: 0 -> ``sparsity`` over the first 60% of the epochs, masks held, finalised."""
    model = copy.deepcopy(dense)
    steps = epochs * -(-len(train) // 64)
    cfg = GradualConfig(final_sparsity=sparsity, end_step=int(0.6 * steps), frequency=max(1, steps // 40),
                        scope="global")  # fmt: skip
    callback = GradualPruningCallback(model, cfg)
    fit(model, train, epochs, 5e-4, [callback])
    finalize_(model, callback.masks)
    return model


def share_weights(pruned, train, test, args) -> tuple[nn.Module, float]:
    """k-means codebooks (``conv_bits`` for convs, ``fc_bits`` for Linear), centroids fine-tuned, frozen."""
    model = copy.deepcopy(pruned)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    config = CodebookConfig(bits=args.fc_bits, overrides={n: {"bits": args.conv_bits} for n in convs})
    quantize_(model, config)
    before = test_accuracy(model, test)
    fit(model, train, args.share_epochs, args.share_lr)
    convert_(model)
    return model, before


def int8_activations(shared: nn.Module) -> nn.Module:
    """A copy whose shared layers run int8 activations: what ``convert_`` does with ``activation_bits: 8``
    (called on the layers directly so that both rows share the very same fine-tuned centroids)."""
    model = copy.deepcopy(shared)
    for layer in model.modules():
        if isinstance(layer, SharedWeights):
            layer.int8_activations_()
    return model


def _exact_reload(model, build, path: Path, x: torch.Tensor) -> bool:
    fresh = load_compressed(build(), path)
    same = model.state_dict().keys() == fresh.state_dict().keys() and all(
        torch.equal(a, fresh.state_dict()[k]) for k, a in model.state_dict().items()
    )
    with torch.no_grad():
        return same and torch.equal(model.eval()(x), fresh.eval()(x))


def _bits_label(model, args) -> str:
    has_conv = any(isinstance(m, (nn.Conv2d, CodebookConv2d)) for m in model.modules())
    return f"{args.conv_bits}-bit conv / {args.fc_bits}-bit fc" if has_conv else f"{args.fc_bits}-bit"


def _nonzero_fraction(model) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def bench_model(key: str, args, out: dict) -> str:
    title, build = MODELS[key]
    bundle = load_mnist(args.data, seed=0)
    sparsity = args.sparsity[key]
    torch.manual_seed(0)
    dense = build()
    fit(dense, bundle.train, args.epochs, 1e-3)
    pruned = prune_gradually(dense, bundle.train, sparsity, args.ft_epochs)
    kept = _nonzero_fraction(pruned)
    shared, acc_unshared = share_weights(pruned, bundle.train, bundle.test, args)
    int8 = int8_activations(shared)
    x = bundle.test[0][0].unsqueeze(0).repeat(8, 1, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {
            "dense (fp32 safetensors)": (dense, save_weights(dense, tmp / "dense.safetensors"), True),
            f"pruned {100 * sparsity:.0f}% (bitmask + fp32 values)": (
                pruned, save_sparse(pruned, tmp / "sparse.safetensors"),
                _sparse_exact(pruned, build, tmp / "sparse.safetensors")),
            f"+ shared weights ({_bits_label(shared, args)}, packed)": (
                shared, save_compressed(shared, tmp / "packed.slim", ("raw", "bitpack")),
                _exact_reload(shared, build, tmp / "packed.slim", x)),
            "+ entropy coding (best of Huffman/zlib/bz2/lzma per tensor)": (
                shared, save_compressed(shared, tmp / "coded.slim"), _exact_reload(shared, build, tmp / "coded.slim", x)),
            "+ int8 activations (int8 codebook, entropy-coded)": (
                int8, save_compressed(int8, tmp / "int8.slim"), _exact_reload(int8, build, tmp / "int8.slim", x)),
        }  # fmt: skip
        coders = _coders(tmp / "coded.slim")
    dense_bytes = files["dense (fp32 safetensors)"][1]
    dense_acc = test_accuracy(dense, bundle.test)
    rows, results = [], {}
    for name, (model, size, exact) in files.items():
        acc = dense_acc if model is dense else test_accuracy(model, bundle.test)
        results[name] = {"accuracy": acc, "bytes": size, "ratio": dense_bytes / size, "reload_exact": exact}
        rows.append([name, acc, f"{acc - dense_acc:+.2f}", f"{size:,}", f"{size / 1024:.1f}",
                     f"{dense_bytes / size:.1f}x", exact])  # fmt: skip
    out[key] = {"rows": results, "weights_kept": kept, "accuracy_shared_before_finetune": acc_unshared,
                "coders": coders, "sparsity": sparsity, "fc_bits": args.fc_bits, "conv_bits": args.conv_bits}  # fmt: skip
    header = ["model", "test acc %", "vs dense", "bytes", "KiB", "ratio", "reload exact"]
    note = (
        f"\nweights kept after pruning: {100 * kept:.1f}%; shared weights before centroid fine-tuning: "
        f"{acc_unshared:.2f}%; coders chosen: {coders}"
    )
    return table(f"{title} on MNIST", header, rows) + note


def _sparse_exact(model, build, path: Path) -> bool:
    fresh = load_sparse(build(), path)
    return all(torch.equal(a, fresh.state_dict()[k]) for k, a in model.state_dict().items())


def _coders(path: Path) -> dict[str, int]:
    """How many tensors of the file each coder won."""
    from slimkit.utils.container import read_header

    header, _ = read_header(path)
    counts: dict[str, int] = {}
    for _dtype, _shape, coder, _length in header["tensors"].values():
        counts[coder] = counts.get(coder, 0) + 1
    return counts


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="shared data folder")
    parser.add_argument("--quick", action="store_true", help="a few epochs: a smoke test, not the figures")
    parser.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "storage.json"))
    parser.add_argument("--sparsity-lenet300", type=float, default=0.95)
    parser.add_argument("--sparsity-lenet5", type=float, default=0.95)
    parser.add_argument("--fc-bits", type=int, default=5)
    parser.add_argument("--conv-bits", type=int, default=6)
    parser.add_argument("--share-lr", type=float, default=1e-4)
    args = parser.parse_args()
    args.sparsity = {"lenet300": args.sparsity_lenet300, "lenet5": args.sparsity_lenet5}
    args.epochs, args.ft_epochs, args.share_epochs = (2, 2, 1) if args.quick else (15, 12, 6)
    return args


def main() -> None:
    args = _args()
    torch.set_num_threads(2)
    out = run_record(args.quick)
    for key in args.only:
        start = time.perf_counter()
        text = bench_model(key, args, out) + f"\n(run time {time.perf_counter() - start:.0f} s)"
        print(text + "\n", flush=True)
        write_json(args.out, out)
    print(f"machine: {out['machine']}\nresults written to {args.out}")


if __name__ == "__main__":
    main()
