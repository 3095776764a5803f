"""``torch.export`` as a second export target: an ExecuTorch-ready ``.pt2`` program.

Why: ``torch.export`` captures the model as an ATen graph that ExecuTorch (``to_edge`` and a
backend such as XNNPACK) lowers for phones and microcontrollers; ``torch.export.save`` writes it
to one file, ``torch.export.load`` runs it again in PyTorch (how the export is checked here).

What works (tests/test_conformance_export.py, ``PT2``): float models, pruned ones (structured,
unstructured, depth), distilled students, codebook (weight-shared), bf16, and weight-only int4 /
int8 and AWQ layers (their kernels, ``aten._weight_int4pack_mm`` / ``_weight_int8pack_mm``, are
ATen ops). int8 activation layers (int8_dynamic, int8_static, QAT, mixed) run fbgemm's packed
weights where the CPU lacks a fast ``torch._int_mm``, which torch.export cannot trace: they
answer ``pt2_problem()`` and are refused naming the layer, before anything is written; their
route to ExecuTorch is its own quantizer (PT2E) on the float model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.batch import first_output
from slimkit.utils.io import atomic_path


def pt2_problem(module: nn.Module) -> str | None:
    """Why ``module`` has no ``torch.export`` form, or None; a layer says so through its own
    ``pt2_problem()`` (as for ONNX, so this package knows no technique's layers)."""
    ask = getattr(module, "pt2_problem", None)
    return ask() if callable(ask) else None


def check_pt2_exportable(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the layers ``torch.export`` cannot take (before any work)."""
    from slimkit.export.onnx import refuse_layers

    supported = (
        "torch.export takes float, pruned, distilled, weight-only (int4/int8), AWQ, codebook and bf16 models"
    )
    refuse_layers(model, pt2_problem, "torch.export", supported)


def export_pt2(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    output_fn: Callable[[Any], Any] = first_output,
) -> Path:
    """``torch.export`` an eval-mode copy of ``model`` and save it; returns the path.

    The program takes the inputs positionally, in ``example_inputs``' order, and returns
    ``output_fn`` of the model's output (a tensor: a causal LM's cache object is not a
    program output).
    """
    from slimkit.export.onnx import _KeywordWrapper

    check_pt2_exportable(model)
    names = list(example_inputs)
    wrapper = _KeywordWrapper(copy.deepcopy(model), names, output_fn).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, tuple(example_inputs[n] for n in names), strict=False)
    with atomic_path(path) as tmp:
        named = tmp.with_name(Path(path).name)  # torch.export.save warns unless the name ends in .pt2
        torch.export.save(program, str(named))
        os.replace(named, tmp)
    return Path(path)


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """The saved program as a callable module (positional inputs, in the exported order)."""
    return torch.export.load(str(path)).module()
