"""Tiny encoders and toy text data shared by the transfer and multi-task tests."""

from __future__ import annotations

import torch

from slimkit.data.base import DataBundle, TextDataset

WORDS = {0: ["bad", "awful", "poor"], 1: ["good", "great", "nice"], 2: ["red", "blue", "green"]}


def tokenizer():
    from transformers import AutoTokenizer

    from slimkit.models.hf import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def tiny_bert(vocab_size: int, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def save_tiny_bert(folder):
    """A tiny BERT with MiniLM's tokenizer saved as a Hugging Face folder (what recipes load by path)."""
    tok = tokenizer()
    tiny_bert(tok.vocab_size).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def toy_rows(n: int, classes: int = 2, seed: int = 0, score: bool = False) -> list[dict]:
    """Sentences whose label is the word family they use; ``score`` adds a regression target."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % classes
        words = WORDS[label]
        picks = torch.randint(0, len(words), (3,), generator=gen).tolist()
        text = " ".join(words[j] for j in picks) + f" item {i}"
        row = {"text": text, "text_pair": None}
        row.update({"score": float(label) * 2.0 + 0.1 * picks[0]} if score else {"label": label})
        rows.append(row)
    return rows


def toy_bundle(
    n: int = 64, classes: int = 2, seed: int = 0, score: bool = False, name: str = "toy"
) -> DataBundle:
    rows = toy_rows(n, classes, seed, score)
    cut1, cut2 = int(0.6 * n), int(0.8 * n)
    return DataBundle(
        name,
        "regression" if score else "classification",
        TextDataset(rows[:cut1]),
        TextDataset(rows[cut2:]),
        TextDataset(rows[cut1:cut2]),
        num_classes=None if score else classes,
        input_kind="text",
    )


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return all(torch.equal(x, y.detach()) for x, y in zip(a, b, strict=True))
