"""Tiny causal language models built from configs offline (never downloaded), with a tiny tokenizer."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a language model predicts the next token from the tokens before it. "
    "small models run fast on two cores, and caches make decoding cheaper. "
)


def text_lines(n: int) -> str:
    """Numbered lines, so a test can tell which part of the text a window came from."""
    words = CORPUS.split()
    return "".join(f"line {i:04d} {' '.join(words[i % 7 : i % 7 + 6])}\n" for i in range(n))


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on a few sentences (about 300 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS, text_lines(50)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_config(kind: str, vocab_size: int, positions: int = 128):
    import transformers

    # grouped-query attention: 4 query heads share 2 key/value heads
    shared = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**shared, tie_word_embeddings=True)
    if kind == "qwen2":
        return transformers.Qwen2Config(**shared)
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=positions
        )
    raise ValueError(kind)


def tiny_lm(kind: str = "llama", vocab_size: int = 320, positions: int = 128, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size, positions)).eval()


def save_tiny_lm(folder: Path, kind: str = "llama", positions: int = 128) -> Path:
    """A tiny causal LM and its tokenizer saved as a Hugging Face folder (what a recipe loads)."""
    tok = tiny_tokenizer()
    tiny_lm(kind, len(tok), positions).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def uneven_norms_(model, seed: int | None = 1):
    """Spread every RMSNorm gain over 0.2..4 in a random order, in place: the layers' inputs then have
    strong and weak channels, as trained LLMs have (with all gains 1, activation-aware methods have
    nothing to find). ``seed=None`` draws the orders from torch's global generator."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            n = module.weight.numel()
            module.weight.data = torch.linspace(0.2, 4.0, n)[torch.randperm(n, generator=gen)]
    return model


def tiny_run_overrides(folder: Path, text: Path, run_dir: Path, seq_len: int = 32) -> list[str]:
    """``slimkit run`` overrides that point an LLM recipe at a tiny model and text, measured briefly."""
    return [
        f"model.hf={folder}",
        "model.hf_task=causal_lm",
        "data.name=text",
        f"data.path={text}",
        f"data.seq_len={seq_len}",
        "measure.repeats=1",
        "measure.warmup=0",
        "measure.generation.prompt_tokens=16",
        "measure.generation.new_tokens=8",
        "measure.generation.batch_sizes=[1]",
        "measure.generation.repeats=1",
        f"output={run_dir}",
    ]


@contextlib.contextmanager
def bench_script(name: str) -> Iterator[ModuleType]:
    """``bench/NAME.py`` imported as a module, ``bench/`` on the path meanwhile (the scripts import
    their shared helpers as ``benchlib``)."""
    folder = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(folder)
