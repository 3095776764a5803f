"""What ``quantize_`` and ``convert_`` did to a model."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class QuantSummary:
    """The result of :func:`~slimkit.quant.quantize_` / :func:`~slimkit.quant.convert_` (module names as keys).

    ``quantized``: layer -> what it became (the new module's ``extra_repr``);
    ``skipped``: layer -> why it stays float; ``folded``: BatchNorm -> the conv
    it was folded into; ``prepared``: layers fake-quantized by a training method
    (QAT), waiting for training and ``convert_``; ``analysis``: mixed
    precision's per-layer sensitivity and choice (``sensitivity``, ``order``,
    ``high``, ``trace``), else None; ``kernels``: compute path -> the kernel its
    layers run on this machine and why (``slimkit.utils.dispatch``), e.g.
    ``{"int8 GEMM": "fbgemm (no AVX-512 VNNI: ...)"}``.
    """

    method: str
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, str] = field(default_factory=dict)
    analysis: dict | None = None
    kernels: dict[str, str] = field(default_factory=dict)


def kernels_of(modules: Iterable) -> dict[str, str]:
    """``{path: "kernel (why)"}`` for the layers that say which kernel they run (``kernel()``); logged.

    Why: the kernel depends on the processor (an int8 GEMM without AVX-512 VNNI runs on fbgemm,
    bf16 without AVX-512 BF16 in float32), so the step says what it chose instead of silently
    running a path slower than float32.
    """
    found = {}
    for module in modules:
        ask = getattr(module, "kernel", None)
        choice = ask() if callable(ask) else None
        if choice is not None and choice.path not in found:
            found[choice.path] = f"{choice.kernel} ({choice.why})"
            level = logging.WARNING if choice.slower else logging.INFO  # never slower than fp32 silently
            logging.getLogger("slimkit.quant").log(level, "kernel: %s", choice.line())
    return found
