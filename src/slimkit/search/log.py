"""The search's state on disk: ``candidates.jsonl`` (one line per evaluated candidate) and
``signals.json``, in a state folder that survives a crash.

Each line is written, flushed and fsynced before the next candidate starts, so after ``kill -9``
every finished candidate is on disk and at most the line being written is torn (it is dropped on
reading). The first line is a header holding the search's fingerprint (the config, the model's
weights, the data's sizes): a log written by another search is never reused, it is started over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.utils.io import write_json

VERSION = 1
LOG = "candidates.jsonl"
SIGNALS = "signals.json"


def fingerprint(model: nn.Module, parts: dict[str, Any]) -> str:
    """sha256 of the model's structure and weights and of ``parts`` (config, data sizes, ...)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class CandidateLog:
    """Read the finished candidates of an earlier run of the same search; append new ones."""

    def __init__(self, folder: Path | None, key: str):
        self.folder, self.key = folder, key
        self.done: dict[str, dict[str, Any]] = {}
        self.restarted = False  # a log of another search was found and replaced
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._read()

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / LOG

    def _read(self) -> None:
        lines = self._lines()
        header = lines[0] if lines else None
        if header is None or header.get("header") != {"version": VERSION, "fingerprint": self.key}:
            self.restarted = bool(lines)
            self._write_header()
            return
        for entry in lines[1:]:
            self.done[entry["key"]] = entry

    def _lines(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the line being written when the process died
                break
        return out

    def _write_header(self) -> None:
        header = json.dumps({"header": {"version": VERSION, "fingerprint": self.key}})
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(header + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def append(self, entry: dict[str, Any]) -> None:
        self.done[entry["key"]] = entry
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- the signals, measured once -----------------------------------------------------------------
    def signals(self) -> dict[str, Any] | None:
        if self.folder is None or self.restarted or not self.done and not (self.folder / SIGNALS).exists():
            return None
        try:
            data = json.loads((self.folder / SIGNALS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data["signals"] if data.get("fingerprint") == self.key else None

    def save_signals(self, signals: dict[str, Any]) -> None:
        if self.folder is not None:
            write_json(self.folder / SIGNALS, {"fingerprint": self.key, "signals": signals})
