"""What a model costs: parameters, non-zeros, multiply-accumulates, bytes, memory.

None of these functions changes the model (weights, dtype, train/eval mode).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from slimkit.errors import ModelError
from slimkit.metrics.modes import eval_mode
from slimkit.utils.io import save_weights
from slimkit.utils.memory import release_free_memory


def _effective_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Each weight tensor once, as the model computes with it.

    - tied weights (one tensor reachable under two names) are yielded once;
    - ``torch.nn.utils.prune`` re-parametrisation (``weight_orig`` x ``weight_mask``)
      and ``torch.nn.utils.parametrize`` yield the effective ``weight``, so
      pruned zeros are seen;
    - packed quantized modules (no parameters, ``weight()``/``bias()`` methods)
      yield their quantized weight and bias.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    # Packed layers hand out freshly dequantized tensors; holding them until the
    # end stops the allocator from reusing an address, which would make two
    # distinct same-shaped weights look tied and undercount the model.
    alive: list[torch.Tensor] = []
    for tensor in _weights_in_use(model):
        alive.append(tensor)
        try:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
            key = (id(tensor), 0, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            yield tensor


def _weights_in_use(model: nn.Module) -> Iterator[torch.Tensor]:
    hidden: set[int] = set()  # originals behind a parametrization
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                hidden.update(id(p) for p in plist.parameters())
                yield getattr(module, name)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in hidden:
                continue
            if name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask"):
                param = getattr(module, name[: -len("_orig")])
            yield param
        if _is_packed(module):
            yield from _packed_tensors(module)


def _is_packed(module: nn.Module) -> bool:
    """A quantized module whose weights live in a packed blob read through ``weight()``."""
    accessor = getattr(type(module), "weight", None)
    return callable(accessor) and next(module.parameters(recurse=False), None) is None


def _packed_tensors(module: nn.Module) -> list[torch.Tensor]:
    tensors = []
    for accessor in ("weight", "bias"):
        if callable(getattr(type(module), accessor, None)):
            with contextlib.suppress(Exception):
                value = getattr(module, accessor)()
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors


def _declared(model: nn.Module, key: str) -> int | None:
    """A runtime wrapper (an ONNX Runtime session) holds no torch weights; it declares its source model's counts."""
    counts = getattr(model, "source_counts", None)
    return None if counts is None else counts[key]


def count_parameters(model: nn.Module) -> int:
    """Number of weights; a tensor shared by several layers (tied weights) counts once."""
    if (declared := _declared(model, "params")) is not None:
        return declared
    with torch.no_grad():
        return sum(t.numel() for t in _effective_tensors(model))


def _nonzero(t: torch.Tensor) -> int:
    if t.is_quantized:
        t = t.dequantize()
    try:
        return int(torch.count_nonzero(t.detach()))
    except (RuntimeError, NotImplementedError, TypeError):
        if hasattr(t, "dequantize"):  # torchao-style quantized tensor subclasses
            return int(torch.count_nonzero(t.dequantize()))
        raise


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero weights (masked weights for pruned layers; tied weights once)."""
    if (declared := _declared(model, "nonzero")) is not None:
        return declared
    with torch.no_grad():
        return sum(_nonzero(t) for t in _effective_tensors(model))


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # The fused CPU attention kernel has no formula in FlopCounterMode; its maths
    # is the same two batched matmuls as the CUDA kernels'.
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _custom_flop_mapping() -> dict:
    aten = torch.ops.aten
    ops = ["_scaled_dot_product_flash_attention_for_cpu"]
    return {getattr(aten, op): _cpu_sdpa_flops for op in ops if hasattr(aten, op)}


def _packed_layer_macs(module: nn.Module, output: Any) -> int:
    """MACs of a packed quantized Linear/Conv, whose kernels FlopCounterMode cannot see."""
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(getattr(module, "in_features", None), int):
        return output.numel() * module.in_features
    kernel = getattr(module, "kernel_size", None)
    if isinstance(getattr(module, "in_channels", None), int) and kernel is not None:
        kernel = (kernel,) if isinstance(kernel, int) else tuple(kernel)
        per_output = module.in_channels // getattr(module, "groups", 1) * int(torch.tensor(kernel).prod())
        return output.numel() * per_output
    return 0


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (dense count).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (flops / 2), which
    sees every matmul, linear, convolution (groups aware) and attention call,
    functional ones included. Leaf modules whose work runs in packed quantized
    kernels (FlopCounterMode sees nothing) are counted from their shapes by
    forward hooks. Pruned zeros still count: this is the dense cost.
    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of
    keyword inputs. The model runs once in eval mode under ``torch.no_grad``.
    """
    if hasattr(model, "source_counts"):
        raise ModelError(f"{type(model).__name__}: its operations run outside PyTorch and cannot be counted")
    counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())
    extra = [0]
    handles = []
    for module in model.modules():
        if _is_packed(module):
            handles += _packed_hooks(module, counter, extra)
    try:
        with eval_mode(model), torch.no_grad(), counter:
            _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() // 2 + extra[0]


def _packed_hooks(module: nn.Module, counter: FlopCounterMode, extra: list[int]) -> list:
    before = [0]

    def pre(_module, _inputs):
        before[0] = counter.get_total_flops()

    def post(_module, _inputs, output):
        if counter.get_total_flops() == before[0]:
            extra[0] += _packed_layer_macs(module, output)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (models saved as several files)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    raise FileNotFoundError(f"no such file or folder: {path}")


def saved_size(model: nn.Module) -> int:
    """Bytes of the model's weights saved as safetensors (written to a temporary file and measured)."""
    with tempfile.TemporaryDirectory(prefix="slimkit-size-") as folder:
        path = Path(folder) / "model.safetensors"
        save_weights(model, path)
        return file_size(path)


@dataclass
class MemoryStats:
    """Peak resident memory of one call, in bytes.

    ``peak_bytes`` is how far the process's resident set rose above its level
    just before the call (activations, temporaries, anything loaded lazily);
    memory already resident (the weights) is in ``baseline_bytes``.
    ``method`` says how the peak was taken: ``"hwm"`` (the kernel's exact
    high-water mark, reset before the call) or ``"sampling"`` (RSS read every
    ``interval`` seconds by a background thread; short spikes may be missed).
    """

    peak_bytes: int
    baseline_bytes: int
    peak_rss_bytes: int
    method: str


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM missing from /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], interval: float = 0.0005) -> MemoryStats:
    """Peak rise of the process's resident memory (RSS) during one call of ``fn`` (Linux).

    Runs ``fn`` once under ``torch.inference_mode``. Uses the exact kernel
    high-water mark when it can be reset, otherwise samples RSS in a thread.
    """
    if not Path("/proc/self/statm").exists():
        raise OSError("peak_memory needs Linux /proc to read resident memory")
    release_free_memory()
    baseline = _rss()
    if _reset_hwm():
        with torch.inference_mode():
            fn()
        peak = max(_hwm(), baseline)
        return MemoryStats(peak - baseline, baseline, peak, "hwm")
    peak = _sampled_peak(fn, interval)
    return MemoryStats(max(peak - baseline, 0), baseline, max(peak, baseline), "sampling")


def _sampled_peak(fn: Callable[[], Any], interval: float) -> int:
    peak = [_rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with torch.inference_mode():
            fn()
        peak[0] = max(peak[0], _rss())
    finally:
        done.set()
        thread.join()
    return peak[0]
