"""Greedy decoding with the KV cache, and how fast a causal LM reads a prompt and writes tokens.

``prefill`` is one forward pass over the prompt (it fills the KV cache and gives
the first new token); ``decode`` is the one-token steps after it, each reusing
the cache. Both are reported in tokens per second over the whole batch:
``batch * prompt_tokens / prefill time`` and ``batch * new_tokens / decode
time``. Timings are medians of repeated runs with a fixed thread count, and
several models are timed interleaved (round-robin, rotating who goes first),
as in :func:`slimkit.metrics.speed.compare_latency`, so their ratios are fair
on a noisy machine.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slimkit.metrics.modes import eval_mode
from slimkit.metrics.speed import fixed_threads


@dataclass
class GenerationSpeed:
    """Median timings of one model at one batch size."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float  # all new_tokens decode steps together
    repeats: int
    threads: int | None

    @property
    def prefill_tokens_per_s(self) -> float:
        return (
            self.batch_size * self.prompt_tokens * 1000.0 / self.prefill_ms
            if self.prefill_ms
            else float("inf")
        )

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens * 1000.0 / self.decode_ms if self.decode_ms else float("inf")

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def _options(model: nn.Module, last_only: bool) -> tuple[str, dict]:
    """(the forward argument taking the KV cache, extra arguments), looked up once per generation.

    The cache argument is ``cache`` from transformers 5.24 on, ``past_key_values`` before.
    ``logits_to_keep=1`` where the model takes it: generation needs only the last position's logits.
    """
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    extra = {"use_cache": True}
    if last_only and "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return ("cache" if "cache" in params else "past_key_values"), extra


def _step(model: nn.Module, ids: torch.Tensor, cache: object, options: tuple[str, dict]):
    """One cached forward pass: (next greedy token per row, the updated KV cache)."""
    key, extra = options
    out = model(input_ids=ids, **{key: cache}, **extra)
    new_cache = getattr(out, "cache", None)
    return _next_token(out), new_cache if new_cache is not None else getattr(out, "past_key_values", None)


def _next_token(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -1].argmax(-1)


def prefill(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(first new token per row, KV cache) from one pass over the prompt."""
    return _step(model, input_ids, None, _options(model, last_only=True))


def decode(model: nn.Module, token: torch.Tensor, cache: object, steps: int) -> torch.Tensor:
    """``steps`` one-token passes from ``token`` with the KV cache; returns the ``[batch, steps]`` tokens fed in."""
    options = _options(model, last_only=True)
    fed = []
    for _ in range(steps):
        fed.append(token)
        token, cache = _step(model, token[:, None], cache, options)
    return torch.stack(fed, dim=1)


def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """The prompt followed by up to ``max_new_tokens`` greedy tokens, shape ``[batch, prompt + new]``.

    ``use_cache=False`` reruns the whole sequence at every step (slow; the reference the cached
    path must match). Stops early once every row has produced ``eos_token_id``.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with eval_mode(model), torch.inference_mode():
        cache, options = None, _options(model, last_only=False)
        for step in range(max_new_tokens):
            if use_cache:
                token, cache = _step(model, ids if cache is None else ids[:, -1:], cache, options)
            else:
                token = _next_token(model(input_ids=ids, use_cache=False))
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            ids = torch.cat([ids, token[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()) and step < max_new_tokens - 1:
                break
    return ids


def prompt_batch(prompt_ids: torch.Tensor, batch_size: int, prompt_tokens: int) -> torch.Tensor:
    """``[batch_size, prompt_tokens]`` prompts: the first ``prompt_tokens`` of each row, rows reused in turn."""
    rows = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
    if rows.shape[1] < prompt_tokens:
        raise ValueError(f"prompt_tokens: the prompts have {rows.shape[1]} tokens, {prompt_tokens} asked")
    index = torch.arange(batch_size) % rows.shape[0]
    return rows[index, :prompt_tokens].long().contiguous()


class _Eager:
    """A model decoded eagerly, behind the ``prefill``/``decode`` pair that
    :class:`slimkit.metrics.compiled.CompiledDecoding` has too, so timing treats both alike."""

    def __init__(self, model: nn.Module):
        self.model = model

    def prefill(self, ids: torch.Tensor):
        return prefill(self.model, ids)

    def decode(self, token: torch.Tensor, cache: object, steps: int) -> torch.Tensor:
        return decode(self.model, token, cache, steps)


def _time_once(runner, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    token, cache = runner.prefill(ids)
    middle = time.perf_counter()
    runner.decode(token, cache, new_tokens)
    return (middle - start) * 1000.0, (time.perf_counter() - middle) * 1000.0


def compare_generation_speed(
    models: Mapping[str, nn.Module | Any],
    prompt_ids: torch.Tensor,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = 2,
) -> dict[str, dict[int, GenerationSpeed]]:
    """``{model name: {batch size: GenerationSpeed}}``, all models timed interleaved, medians of ``repeats``.

    A value may be a :class:`slimkit.metrics.compiled.CompiledDecoding` (static cache, compiled
    step) instead of a model. ``prompt_ids`` holds one or more token rows (real text); each batch takes the first
    ``prompt_tokens`` of its rows, reusing rows in turn when there are fewer rows than the batch.
    """
    names = list(models)
    if not names:
        raise ValueError("compare_generation_speed: no models")
    for label, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}: must be a positive integer, got {value!r}")
    prompts = {b: prompt_batch(prompt_ids, b, prompt_tokens) for b in batch_sizes}
    times: dict[tuple[str, int], list[tuple[float, float]]] = {(n, b): [] for n in names for b in batch_sizes}
    runners = {n: _Eager(m) if isinstance(m, nn.Module) else m for n, m in models.items()}
    with fixed_threads(threads), torch.inference_mode(), ExitStack() as stack:
        for runner in runners.values():
            stack.enter_context(eval_mode(runner.model))
        for round_ in range(warmup + repeats):
            shift = round_ % len(names)
            for b in batch_sizes:
                for name in names[shift:] + names[:shift]:
                    timing = _time_once(runners[name], prompts[b], new_tokens)
                    if round_ >= warmup:
                        times[(name, b)].append(timing)
    return {
        n: {b: _stats(times[(n, b)], b, prompt_tokens, new_tokens, repeats, threads) for b in batch_sizes}
        for n in names
    }


def _stats(samples, batch_size, prompt_tokens, new_tokens, repeats, threads) -> GenerationSpeed:
    prefill_ms = statistics.median(s[0] for s in samples)
    decode_ms = statistics.median(s[1] for s in samples)
    return GenerationSpeed(batch_size, prompt_tokens, new_tokens, prefill_ms, decode_ms, repeats, threads)


def generation_speed(
    model: nn.Module,
    prompt: torch.Tensor | str,
    tokenizer=None,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = 2,
) -> dict[int, GenerationSpeed]:
    """Prefill and decode speed of one model: ``{batch size: GenerationSpeed}``.

    ``prompt`` is token ids (``[tokens]`` or ``[rows, tokens]``) or a text, then tokenized with
    ``tokenizer`` (it must give at least ``prompt_tokens`` tokens).
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("generation_speed: a text prompt needs the tokenizer")
        prompt = torch.as_tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    result = compare_generation_speed(
        {"model": model}, prompt, prompt_tokens, new_tokens, batch_sizes, repeats, warmup, threads
    )
    return result["model"]
