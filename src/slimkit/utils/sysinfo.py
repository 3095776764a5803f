"""What ``slimkit info`` prints, and the machine line every benchmark table carries.

Versions are read from the installed packages' metadata, not by importing them, so
``slimkit info`` stays as light as ``slimkit --help`` (no transformers, no onnxruntime).
"""

from __future__ import annotations

import os
from importlib import metadata

import torch

from slimkit.utils import cpu, dispatch

LIBRARIES = ("slimkit", "torch", "transformers", "onnxruntime", "onnx", "torchao")


def library_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`LIBRARIES` (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):
        return "load average unknown"


def cpu_line() -> str:
    """``AMD EPYC; torch AVX512; avx2 avx512_vnni avx512_bf16; 2 cores``: what the kernels depend on."""
    cap = cpu.capability()
    flags = " ".join(cap["flags"]) or "no AVX2"
    if cap.get("capped_by"):
        flags += f" (capped by {cap['capped_by']}; the CPU has {' '.join(cap['hardware_flags']) or 'none'})"
    return f"{cap['model']}; torch {cap['torch']}; {flags}; {cap['cores']} cores"


def machine_line() -> str:
    """The CPU capability beside the load average, for a benchmark table's header or footer."""
    return f"machine: {cpu_line()}; {torch.get_num_threads()} threads; {load_average()}"


def info() -> dict:
    """The machine, the libraries and the kernel each path will use (``slimkit info --json``)."""
    cap = cpu.capability()
    return {
        "cpu": cap["model"],
        "torch_capability": cap["torch"],
        "flags": list(cap["flags"]),
        "hardware_flags": list(cap.get("hardware_flags", cap["flags"])),
        "capped_by": cap.get("capped_by"),
        "library_caps": {k: v for k, v in cpu.emulation().items() if v is not None},
        "cores": cap["cores"],
        "threads": torch.get_num_threads(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "versions": library_versions(),
        "kernels": {c.path: {"kernel": c.kernel, "why": c.why} for c in dispatch.kernel_table()},
    }


def info_text() -> str:
    """``slimkit info``'s text: one line per fact, then one per compute path."""
    data = info()
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in data["versions"].items())
    lines = [
        f"cpu: {data['cpu']}",
        f"features: {' '.join(data['flags']) or '(none of ' + ', '.join(cpu.FLAGS) + ')'}",
        *_cap_lines(data),
        f"torch cpu capability: {data['torch_capability']}; oneDNN "
        f"{'enabled' if data['mkldnn_enabled'] else 'disabled'}; "
        f"quantized engines: {', '.join(data['quantized_engines'])}",
        f"threads: {data['threads']} (of {data['cores']} usable cores); {load_average()}",
        f"versions: {versions}",
        "kernels:",
    ]
    lines += [f"  {c.line()}" for c in dispatch.kernel_table()]
    return "\n".join(lines)


def _cap_lines(data: dict) -> list[str]:
    """What the library caps in the environment change, and which of :data:`cpu.EMULATE_AVX2` are missing."""
    caps = data["library_caps"]
    if not caps and not data["capped_by"]:
        return []
    set_ = ", ".join(f"{k}={v}" for k, v in caps.items())
    lines = [f"library caps: {set_}; the CPU itself has {' '.join(data['hardware_flags']) or 'none'}"]
    missing = [f"{k}={v}" for k, v in cpu.EMULATE_AVX2.items() if k not in caps]
    if missing:
        lines.append(f"  to run every library's AVX2 code, also set {' '.join(missing)}")
    lines.append("  ONNX Runtime has no such cap: its kernels still use what the CPU has")
    return lines
