"""Graceful under load: int8 layers drop to one thread when the CPU is oversubscribed, with identical results.

The timing itself is a benchmark (bench/bench_load.py); these tests check the decision
(a fake load probe), that the thread count is restored, and that the outputs do not
change by a bit when the layers run single-threaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit.quant.kernels as kernels
import slimkit.utils.cpu as cpu
from slimkit.quant import Int8DynamicConfig, Int8StaticConfig, quantize_


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)


def test_probe_samples_at_most_once_per_interval_and_smooths(two_cores):
    values, clock = iter([4.0, 0.0, 0.0, 0.0]), FakeClock()
    calls = []

    def sample():
        calls.append(clock.now)
        return next(values)

    probe = cpu.LoadProbe(interval_s=1.0, sample=sample, clock=clock)
    assert probe.oversubscribed(2) and probe.others == 1.0  # a quarter of the weight to the newest
    clock.now = 0.5
    assert probe.oversubscribed(2) and calls == [0.0]  # within the interval: no new sample
    clock.now, expected = 1.0, 0.75
    assert probe.oversubscribed(2) and probe.others == expected
    clock.now, expected = 2.0, 0.5625
    assert probe.oversubscribed(2) and probe.others == expected  # 0.5625 + 2 threads > 2 cores + 0.5
    clock.now, expected = 3.0, 0.421875
    assert not probe.oversubscribed(2) and probe.others == expected  # the load has gone
    assert probe.oversubscribed(3)  # the same load is too much for 3 threads
    assert calls == [0.0, 1.0, 2.0, 3.0]


def test_one_sample_of_a_short_spike_does_not_flip_the_decision(two_cores):
    assert not cpu.LoadProbe(sample=lambda: 2.0).oversubscribed(2)


@pytest.mark.parametrize(
    ("others", "threads", "expected"), [(0, 2, False), (1, 2, True), (2, 1, True), (0, 3, True)]
)
def test_probe_threshold_is_runnable_threads_against_cores(two_cores, others, threads, expected):
    probe = cpu.LoadProbe(sample=lambda: float(others), clock=FakeClock())
    probe.others = float(others)  # as after a steady load
    assert probe.oversubscribed(threads) is expected


def test_probe_falls_back_to_the_load_average_without_proc(two_cores, monkeypatch):
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    probe = cpu.LoadProbe(sample=lambda: None)
    probe.oversubscribed(2)
    assert probe.others == 0.25 * (5.0 - torch.get_num_threads())


def test_others_running_reads_this_machine():
    others = cpu.others_running()
    if not Path("/proc/loadavg").exists():
        assert others is None
    else:
        assert others is not None and others >= 0.0


def test_thread_state_survives_a_command_name_with_parentheses(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("1234 (odd) name) R 1 1234 1234 0 -1 4194304")
    assert cpu._thread_state(stat) == "R"


def test_capability_names_torch_capability_and_flags():
    info = cpu.capability()
    assert info["torch"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["flags"]) <= set(cpu.FLAGS) and info["cores"] >= 1


def _busy_probe() -> cpu.LoadProbe:
    return cpu.LoadProbe(sample=lambda: 64.0)  # even a quarter of it is far beyond the cores


def test_fitted_threads_uses_one_thread_under_load_and_restores(two_threads):
    probe = _busy_probe()
    with cpu.fitted_threads(probe) as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and probe.single_calls == 1
    with pytest.raises(RuntimeError), cpu.fitted_threads(probe):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_fitted_threads_keeps_the_count_on_a_quiet_machine_or_when_turned_off(two_threads, monkeypatch):
    with cpu.fitted_threads(cpu.LoadProbe(sample=lambda: 0.0)) as used:
        assert used == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv(cpu.ADAPT_ENV, "0")
    probe = _busy_probe()
    with cpu.fitted_threads(probe) as used:
        assert used == 2 and torch.get_num_threads() == 2
    assert probe.single_calls == 0


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    x_lin, x_conv = torch.randn(300, 48), torch.randn(4, 8, 10, 10)
    layers = {}
    for name, cfg in {
        "dynamic token": Int8DynamicConfig(),
        "dynamic tensor": Int8DynamicConfig(activation_granularity="tensor"),
        "static": Int8StaticConfig(),
    }.items():
        lin = nn.Sequential(nn.Linear(48, 40))
        conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
        calib = cfg.needs_calibration
        quantize_(lin, cfg, calibration_data=[x_lin] if calib else None)
        quantize_(conv, cfg, calibration_data=[x_conv] if calib else None)
        layers[f"linear {name}"] = (lin.eval(), x_lin)
        layers[f"conv {name}"] = (conv.eval(), x_conv)
    return layers


def test_int8_layers_give_identical_bits_single_threaded_under_load(two_threads, monkeypatch):
    from slimkit.utils import dispatch

    monkeypatch.setenv(dispatch.INT8_ENV, "onednn")  # the row-sliced path, on any CPU (spied on below)
    layers = _layers()
    quiet = {name: m(x) for name, (m, x) in layers.items()}
    seen = []
    gemm = kernels.int8_gemm_rescaled

    def spy(*args):
        seen.append(torch.get_num_threads())
        return gemm(*args)

    monkeypatch.setattr(kernels, "int8_gemm_rescaled", spy)
    monkeypatch.setattr(cpu, "PROBE", _busy_probe())
    for name, (model, x) in layers.items():
        seen.clear()
        out = model(x)
        assert seen and set(seen) == {1}, f"{name}: GEMMs ran with {seen} threads"
        assert torch.equal(out, quiet[name]), name
    assert torch.get_num_threads() == 2
    assert cpu.PROBE.single_calls == len(layers)
