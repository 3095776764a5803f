"""Metrics: hand-computed task scores, parameter/MAC counts, sizes, memory, latency."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import f1_score
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from slimkit.metrics import (
    accuracy,
    compare_latency,
    count_macs,
    count_nonzero,
    count_parameters,
    evaluate,
    macro_f1,
    measure_latency,
    peak_memory,
    pearson,
    perplexity,
    saved_size,
    spearman,
    training_throughput,
)
from slimkit.metrics.model import file_size
from slimkit.metrics.speed import fixed_threads
from slimkit.models.builtin import LeNet5, LeNet300100
from slimkit.utils.io import save_weights

# ---------------------------------------------------------------- task metrics


def test_accuracy_from_labels_and_logits():
    assert accuracy([0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.5
    with pytest.raises(ValueError, match="3 items but targets have 2"):
        accuracy([0, 1, 2], [0, 1])


def test_macro_f1_hand_computed_and_matches_sklearn():
    target = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fn1 -> 0
    assert macro_f1(pred, target) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert macro_f1(p, t) == pytest.approx(f1_score(t, p, average="macro"))
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_correlations_against_scipy_and_known_cases():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b = a + 0.5 * b
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    x = np.arange(1.0, 11.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert pearson(x, x**3) < 0.95  # monotone but not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert isinstance(pearson(a, b), float)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, math.nan, 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [1.0, math.inf, 3.0]))


def test_spearman_averages_tied_ranks_like_scipy():
    # STS-B gold scores and rounded predictions are full of ties: ranks must be averaged, as scipy does.
    rng = np.random.default_rng(2)
    a = rng.integers(0, 6, size=200).astype(float)
    b = np.round(a + rng.normal(size=200), 1)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert spearman([1, 2, 2, 3], [1, 3, 3, 2]) == pytest.approx(
        stats.spearmanr([1, 2, 2, 3], [1, 3, 3, 2])[0]
    )


def test_perplexity_is_exp_nll():
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(0.0) == 1.0


class _FixedLogits(nn.Module):
    """Returns its input as logits (through a Linear fixed to identity, plus a BatchNorm and Dropout)."""

    def __init__(self, n: int):
        super().__init__()
        self.linear = nn.Linear(n, n, bias=False)
        nn.init.eye_(self.linear.weight)
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        return self.drop(self.linear(x))


def test_evaluate_classification_numbers_and_restores_modes():
    torch.manual_seed(0)
    logits = torch.randn(37, 4)
    target = torch.randint(0, 4, (37,))
    model = _FixedLogits(4).train()
    model.drop.eval()  # mixed modes must come back exactly
    loader = DataLoader(TensorDataset(logits, target), batch_size=8)
    result = evaluate(model, loader, "classification")
    assert result["accuracy"] == pytest.approx(accuracy(logits, target))
    assert result["macro_f1"] == pytest.approx(macro_f1(logits, target))
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-5)
    assert model.training and model.linear.training and not model.drop.training
    assert torch.equal(model.linear.weight, torch.eye(4))


def test_evaluate_regression_and_custom_forward():
    torch.manual_seed(1)
    x = torch.randn(30, 3)
    y = x[:, 0] * 2 + 0.1 * torch.randn(30)
    model = nn.Linear(3, 1)
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=7)

    def forward(m, batch):
        return (m(batch[0]),)  # outputs as a tuple: the first item is the prediction

    result = evaluate(model, loader, "regression", forward=forward)
    with torch.no_grad():
        pred = model(x).squeeze(1)
    assert result["mse"] == pytest.approx(float(F.mse_loss(pred, y)), rel=1e-5)
    assert result["pearson"] == pytest.approx(stats.pearsonr(pred.numpy(), y.numpy())[0], abs=1e-6)
    assert result["spearman"] == pytest.approx(stats.spearmanr(pred.numpy(), y.numpy())[0], abs=1e-6)
    assert not model.training
    with pytest.raises(ValueError, match="task"):
        evaluate(model, loader, "ranking")


def test_evaluate_lenet_keeps_train_mode_and_weights():
    torch.manual_seed(2)
    model = LeNet5().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))), batch_size=8)
    result = evaluate(model, loader, "classification")
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0
    assert all(m.training for m in model.modules())
    # BatchNorm running statistics must not move during evaluation.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- model cost


def test_count_parameters_lenet300100_and_tied_weights():
    model = LeNet300100()
    assert count_parameters(model) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610
    assert count_nonzero(model) == 266_610
    with torch.no_grad():
        model.net[1].weight[:100].zero_()
    assert count_nonzero(model) == 266_610 - 100 * 784
    assert count_parameters(model) == 266_610

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 50, bias=False)
            self.head.weight = self.embed.weight

    assert count_parameters(Tied()) == 50 * 8


def test_count_parameters_of_quantized_layers_with_equal_shapes():
    # Four same-shaped int8 layers: each dequantized weight is a fresh tensor, and
    # none may be mistaken for a tied copy of another.
    from slimkit.quant import Int8DynamicConfig, quantize_

    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    float_count = count_parameters(model)
    quantize_(model, Int8DynamicConfig())
    assert count_parameters(model) == float_count == 4 * (32 * 32 + 32)


def test_count_nonzero_sees_pruning_masks():
    model = LeNet300100()
    prune.l1_unstructured(model.net[1], "weight", amount=0.5)
    assert count_parameters(model) == 266_610
    assert count_nonzero(model) == 266_610 - 784 * 300 // 2


def test_macs_linear_conv_and_lenet5_by_hand():
    assert count_macs(nn.Linear(784, 300), torch.randn(1, 784)) == 784 * 300 == 235_200
    assert count_macs(nn.Linear(784, 300), torch.randn(4, 784)) == 4 * 235_200
    # Conv2d 3->8, 3x3, padding 1 on 10x10: each of 8*10*10 outputs takes 3*3*3 MACs.
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 10, 10)) == 8 * 100 * 27 == 21_600
    # Grouped: 4->8 channels in 2 groups, each output sees 2 input channels; 5x5 -> 3x3.
    assert count_macs(nn.Conv2d(4, 8, 3, groups=2), torch.randn(1, 4, 5, 5)) == 8 * 9 * 2 * 9
    assert count_macs(nn.Conv1d(2, 6, 5), torch.randn(1, 2, 20)) == 6 * 16 * 2 * 5
    lenet5 = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    assert count_macs(LeNet5(), torch.randn(1, 1, 28, 28)) == lenet5 == 416_520


def test_macs_functional_attention():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v) + torch.matmul(q, k.transpose(-1, -2)) @ v

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    per_product = 2 * 3 * 5 * 7 * 8  # (5x8)@(8x7) and (5x7)@(7x8) per batch*head
    assert count_macs(Attention(), (q, k, v)) == 4 * per_product


def test_macs_of_dynamically_quantized_linears_match_float():
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        pytest.skip("torch.ao.quantization.quantize_dynamic is not in this torch")
    model = LeNet300100()
    qmodel = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(1, 1, 28, 28)
    assert count_macs(qmodel, x) == count_macs(model, x) == 266_200
    assert count_parameters(qmodel) == 266_610


def test_count_macs_leaves_model_unchanged():
    model = LeNet5().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, {"x": torch.randn(2, 1, 28, 28)})
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_saved_size_is_real_file_size(tmp_path):
    model = LeNet300100()
    size = saved_size(model)
    path = tmp_path / "w.safetensors"
    written = save_weights(model, path)
    assert size == written == os.path.getsize(path) == file_size(path)
    assert 266_610 * 4 < size < 266_610 * 4 + 4096  # float32 weights plus a small header
    assert next(model.parameters()).dtype == torch.float32
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x" * 100)
    assert file_size(tmp_path) == size + 100
    with pytest.raises(FileNotFoundError):
        file_size(tmp_path / "missing")


def test_peak_memory_sees_a_large_temporary():
    n_bytes = 64 * 2**20
    stats_ = peak_memory(lambda: torch.ones(n_bytes // 4).sum())
    assert 0.9 * n_bytes < stats_.peak_bytes < 3 * n_bytes
    assert stats_.peak_rss_bytes >= stats_.baseline_bytes + stats_.peak_bytes - 1
    assert peak_memory(lambda: None).peak_bytes < 8 * 2**20


# ---------------------------------------------------------------- speed


def test_fixed_threads_restores():
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"), fixed_threads(0):
        pass


def test_measure_latency_stats():
    calls = []
    result = measure_latency(lambda: calls.append(time.sleep(0.002)), warmup=2, repeats=5, batch_size=4)
    assert len(calls) == 7 and len(result.samples_ms) == 5
    assert 2.0 <= result.min_ms <= result.median_ms <= result.p95_ms
    assert result.throughput == pytest.approx(4 * 1000 / result.median_ms)
    assert result.to_dict()["throughput"] == result.throughput


def test_compare_latency_interleaves_with_rotation():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "abc"}
    result = compare_latency(fns, warmup=1, repeats=2, threads=1, baseline="b")
    assert order == list("abc" + "bca" + "cab")
    assert result.baseline == "b" and result.speedups["b"] == 1.0
    with pytest.raises(ValueError, match="baseline"):
        compare_latency(fns, baseline="z")


def test_compare_latency_ratio_of_small_and_large_matmul():
    torch.manual_seed(0)
    small, large = torch.randn(96, 96), torch.randn(192, 192)  # 8x the multiply-adds
    # One thread: on a shared 2-core machine a 2-thread OpenMP barrier waits for a busy
    # core, which swamps microsecond kernels (a known hazard, not what is tested here).
    fns = {"large": lambda: large @ large, "small": lambda: small @ small}
    result = compare_latency(fns, warmup=3, repeats=15, number=5, threads=1)
    assert result.speedups["small"] > 1.5
    assert result["small"].median_ms < result["large"].median_ms


def test_training_throughput():
    rate = training_throughput(lambda: time.sleep(0.002), batch_size=8, warmup=1, steps=4)
    assert 500 < rate <= 4000
