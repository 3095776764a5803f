"""The block inputs that block-by-block calibration keeps (:mod:`slimkit.calibration.blocks`), bounded.

The kept inputs are the largest thing calibration holds besides the model:
SmolLM2-135M on 128 windows of 1024 tokens keeps 128 x 1024 x 576 float32
hidden states, 302 MB, more than half the model's 513 MB. :class:`HeldInputs`
holds one entry per (micro-)batch and

- replaces each entry's hidden states by the block's outputs in place, so two
  full copies never exist at once;
- shares keyword tensors that are the same in every batch (rotary cos/sin,
  position ids, masks) instead of keeping one copy per batch;
- optionally (``hold``) keeps the hidden states in bfloat16 (half the bytes;
  the numbers change: they are rounded to bfloat16 between blocks) or in a
  temporary folder on disk, read back one entry at a time (same numbers; the
  operating system's page cache, which it can drop, holds them instead of the
  process).

``split_batch`` cuts a calibration batch into micro-batches, so a block runs on
a bounded number of windows at a time: calibrating with ``micro_batch=m`` is
exactly calibrating with batches of ``m`` windows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from slimkit.batch import batch_len
from slimkit.config import one_of, positive_int, require

HOLDS = ("memory", "bfloat16", "disk")  # where block-by-block calibration keeps a block's inputs


def check_block_fields(config: Any) -> None:
    """Validate a config's block-calibration fields (``sequential``, ``micro_batch``, ``hold_inputs``)."""
    require(
        config.sequential is None or isinstance(config.sequential, bool),
        "sequential",
        "must be true, false or null",
    )
    if config.micro_batch is not None:
        positive_int(config.micro_batch, "micro_batch")
    one_of(config.hold_inputs, "hold_inputs", HOLDS)


def split_batch(batch: Any, size: int | None) -> list[Any]:
    """``batch`` (a tensor, or a dict/tuple/list of them, samples along dim 0) in pieces of ``size`` samples."""
    n = batch_len(batch)
    if size is None or n <= size:
        return [batch]
    return [_slice(batch, i, i + size) for i in range(0, n, size)]


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice(v, start, stop) for v in value)
    return value


class HeldInputs:
    """A block's inputs for every (micro-)batch: ``get(j)`` -> ``(args, kwargs)``, ``set_hidden(j, h)``."""

    def __init__(self, hold: str = "memory"):
        if hold not in HOLDS:
            raise ValueError(f"hold must be one of {HOLDS}, got {hold!r}")
        self.hold = hold
        self._hidden: list[Any] = []  # tensor, or a file path (disk)
        self._rest: list[tuple[tuple, dict]] = []  # args / kwargs without the hidden states
        self._shared: dict[tuple, list[torch.Tensor]] = {}
        self._folder = tempfile.TemporaryDirectory(prefix="slimkit-calib-") if hold == "disk" else None

    def __len__(self) -> int:
        return len(self._hidden)

    def append(self, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        args = (None, *self._share(args[1:])) if args else ()
        kwargs = {k: self._share(v) for k, v in kwargs.items() if k != "hidden_states"}
        self._rest.append((args, kwargs))
        self._hidden.append(None)
        self.set_hidden(len(self._hidden) - 1, hidden)

    def set_hidden(self, j: int, hidden: torch.Tensor) -> None:
        """Entry ``j``'s hidden states become ``hidden`` (the old ones are dropped)."""
        self._hidden[j] = None  # free the old copy before the new one is stored
        if self.hold == "bfloat16":
            hidden = hidden.to(torch.bfloat16)
        elif self.hold == "disk":
            path = Path(self._folder.name) / f"{j}.pt"
            if hidden.untyped_storage().nbytes() > hidden.nbytes:  # a view: save it alone, not its base
                hidden = hidden.clone()
            torch.save(hidden, path)
            hidden = path
        self._hidden[j] = hidden

    def get(self, j: int) -> tuple[tuple, dict]:
        hidden = self._hidden[j]
        if self.hold == "disk":
            hidden = torch.load(hidden, weights_only=True)
        elif self.hold == "bfloat16":
            hidden = hidden.float()
        args, kwargs = self._rest[j]
        if args:
            return (hidden, *args[1:]), kwargs
        return (), {**kwargs, "hidden_states": hidden}

    def shared_bytes(self) -> int:
        """Bytes of the keyword/extra tensors kept (each distinct tensor once)."""
        return sum(t.numel() * t.element_size() for ts in self._shared.values() for t in ts)

    def close(self) -> None:
        self._hidden, self._rest, self._shared = [], [], {}
        if self._folder is not None:
            self._folder.cleanup()

    def _share(self, value: Any) -> Any:
        """``value`` with each tensor replaced by an equal one already kept, if any (rotary, masks)."""
        if isinstance(value, torch.Tensor):
            key = (value.shape, value.dtype, value.device)
            same = self._shared.setdefault(key, [])
            for kept in same:
                if kept is value or torch.equal(kept, value):
                    return kept
            same.append(value)
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self._share(v) for v in value)
        return value
