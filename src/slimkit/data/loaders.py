"""Deterministic DataLoaders and the collate function that tokenizes text rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from slimkit.batch import text_inputs
from slimkit.data.base import TextDataset
from slimkit.errors import DataError

PAIR_MODES = ("separate", "joint")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    collate_fn: Callable | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader whose shuffling depends only on ``seed``.

    Text datasets without a ``collate_fn`` yield plain lists of rows (the default
    collate cannot stack ``None`` pairs).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if collate_fn is None and _is_text(dataset):
        collate_fn = list
    # A private generator keeps the order independent of the global RNG state.
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )


def _is_text(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TextDataset)


def text_collate(
    tokenizer: Callable, max_length: int = 128, pairs: str = "separate"
) -> Callable[[list], dict]:
    """A collate function turning TextDataset rows into a dict of tensors.

    Keys: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
    gives them), then ``labels`` (int64) or ``scores`` (float32). Rows with a
    ``text_pair`` are encoded either ``"separate"``-ly (second sentence under
    ``pair_input_ids``/``pair_attention_mask``, for bi-encoder similarity) or
    ``"joint"``-ly as one ``[CLS] a [SEP] b [SEP]`` sequence (cross-encoder).
    """
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_MODES)}; got {pairs!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")

    def encode(texts: list[str], second: list[str] | None = None) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            texts, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return text_inputs(enc)

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in rows]
        seconds = _pairs(rows)
        if seconds is None:
            batch = encode(texts)
        elif pairs == "joint":
            batch = encode(texts, seconds)
        else:
            batch = encode(texts)
            batch.update({f"pair_{k}": v for k, v in encode(seconds).items()})
        batch.update(_targets(rows))
        return batch

    return collate


def _pairs(rows: Sequence[dict]) -> list[str] | None:
    seconds = [r.get("text_pair") for r in rows]
    if all(s is None for s in seconds):
        return None
    if any(s is None for s in seconds):
        raise DataError("text_collate: a batch mixes rows with and without text_pair")
    return seconds


def _targets(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    if all("label" in r for r in rows):
        return {"labels": torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)}
    if all("score" in r for r in rows):
        return {"scores": torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32)}
    raise DataError("text_collate: every row needs a 'label' or every row a 'score'")
