"""Teacher outputs computed once per sample and reused across epochs (and runs).

Samples are keyed by the bytes of their inputs (for text, the token ids
without padding), so the cache works with any loader order and batch size and
needs no sample indices in the batch. Token-level tensors are stored without
their padding and padded again to the batch they are used in. The file is
safetensors (no pickle); it is written atomically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimkit.utils.io import atomic_path

TeacherResult = dict[str, list[torch.Tensor]]  # kind -> one tensor per forward call of the batch
MASK_KEYS = ("attention_mask", "pair_attention_mask")
ID_KEYS = ("input_ids", "pair_input_ids")


def batch_masks(batch: Any) -> list[torch.Tensor]:
    """Padding masks of a text batch, one per sentence column (empty for tensor batches)."""
    if not isinstance(batch, dict):
        return []
    return [batch[k] for k in MASK_KEYS if k in batch]


def sample_keys(batch: Any) -> list[str]:
    """One content hash per sample."""
    if isinstance(batch, dict):
        columns = [(batch[i], batch.get(m)) for i, m in zip(ID_KEYS, MASK_KEYS) if i in batch]
        n = len(columns[0][0])
        return [
            _hash(ids[j][mask[j].bool()] if mask is not None else ids[j] for ids, mask in columns)
            for j in range(n)
        ]
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return [_hash([x[j]]) for j in range(len(x))]


def _hash(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def _is_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return mask is not None and t.dim() >= 3 and t.shape[1] == mask.shape[1]


class TeacherCache:
    """In-memory map from sample key to the teacher's per-sample tensors; ``save`` writes it."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0
        self._dirty = False
        if self.path is not None and self.path.is_file():
            for name, tensor in load_file(str(self.path)).items():
                key, _, kind = name.partition("/")
                self.entries.setdefault(key, {})[kind] = tensor

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, batch: Any, kinds: Iterable[str] = ()) -> TeacherResult | None:
        """The batch's teacher result if every sample is cached with each of ``kinds``, else None.

        ``kinds`` (e.g. ``"layer:encoder.layer.0"``) guards against entries written by a run that
        recorded less, such as embeddings only: those count as misses and are computed again.
        """
        keys = sample_keys(batch)
        need = set(kinds)
        if not all(k in self.entries and need <= _kinds(self.entries[k]) for k in keys):
            self.misses += 1
            return None
        self.hits += 1
        return _merge([self.entries[k] for k in keys], batch_masks(batch))

    def put(self, batch: Any, result: TeacherResult) -> None:
        masks = batch_masks(batch)
        for j, key in enumerate(sample_keys(batch)):
            self.entries[key] = _split_one(result, masks, j)
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        flat = {f"{key}/{kind}": t for key, kinds in self.entries.items() for kind, t in kinds.items()}
        with atomic_path(self.path) as tmp:
            save_file(flat, str(tmp))
        self._dirty = False


def _kinds(entry: dict[str, torch.Tensor]) -> set[str]:
    return {name.rpartition("#")[0] for name in entry}


def _split_one(result: TeacherResult, masks: list[torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    out = {}
    for kind, tensors in result.items():
        for call, t in enumerate(tensors):
            mask = masks[call] if call < len(masks) else None
            row, tag = t[j], ""
            if _is_tokens(t, mask):
                row, tag = row[: int(mask[j].sum())], "~t"  # right padding: real tokens come first
            out[f"{kind}#{call}{tag}"] = row.detach().to("cpu").clone()
    return out


def _merge(samples: list[dict[str, torch.Tensor]], masks: list[torch.Tensor]) -> TeacherResult:
    result: TeacherResult = {}
    for name in samples[0]:
        kind, _, call_text = name.rpartition("#")
        call = int(call_text.removesuffix("~t"))
        rows = [s[name] for s in samples]
        if call_text.endswith("~t"):
            rows = [_pad(r, masks[call].shape[1]) for r in rows]
        result.setdefault(kind, []).append((call, torch.stack(rows)))
    return {k: [t for _, t in sorted(v, key=lambda p: p[0])] for k, v in result.items()}


def _pad(row: torch.Tensor, length: int) -> torch.Tensor:
    if row.shape[0] == length:
        return row
    pad = row.new_zeros((length - row.shape[0], *row.shape[1:]))
    return torch.cat([row, pad])
