"""Launching a test file under ``torchrun`` (CPU processes, gloo) and as one plain process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int = 2) -> list[str]:
    """The command that starts ``processes`` copies of what follows it, on a free port."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    return [*run, f"--master_port={free_port()}"]


def launch(command: list[str], timeout: float = 300) -> None:
    """Run ``command`` outside any torchrun group the tests may be in, one thread a process."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # One thread everywhere: the same arithmetic in every process and in the single-process run.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_worker(launcher: list[str], script: str, out: Path) -> None:
    """``launcher script out`` with ``out`` made first (the worker writes its results there)."""
    out.mkdir()
    launch([*launcher, script, str(out)])


def two_processes_and_one(script: str, tmp: Path) -> dict[str, tuple[dict, dict]]:
    """``script out`` under torchrun (2 processes) and as one process; each writes ``result.json`` and
    ``results.pt`` into ``out``: ``{"ddp": (json, tensors), "single": (json, tensors)}``."""
    import json

    import torch

    run_worker(torchrun(2), script, tmp / "ddp")
    run_worker([sys.executable], script, tmp / "single")
    return {
        name: (json.loads((tmp / name / "result.json").read_text()), torch.load(tmp / name / "results.pt"))
        for name in ("ddp", "single")
    }
