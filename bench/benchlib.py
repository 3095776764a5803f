"""Helpers shared by the benchmark scripts (imported as ``benchlib``: scripts run from ``bench/``)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import torch


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout keeps the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def state_bytes(obj) -> int:
    """Bytes of a state dict written with torch.save (for formats safetensors cannot hold)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def uptime() -> str:
    """``uptime``'s line (the load averages), or ``/proc/loadavg`` where the command is missing."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=False, timeout=5).stdout
        return " ".join(out.split())
    except (OSError, subprocess.SubprocessError):
        return "loadavg " + Path("/proc/loadavg").read_text().strip()
