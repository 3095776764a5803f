"""Generation speed of every step's language model, for the report (``measure.generation``).

The runner keeps a frozen copy of each step's model for the latency round;
here those copies also decode greedily with the KV cache, all steps
interleaved (:func:`slimkit.metrics.generation.compare_generation_speed`), so
the decode speedups in the report are fair ratios. Prompts are real text: rows
of ``prompt_tokens`` cut from the test tokens. Figures go into each row's
``extra["generation"]`` (the report shows one column per entry) and the
settings into ``extra["generation_setup"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from slimkit.errors import ConfigError
from slimkit.metrics.compiled import CompiledDecoding
from slimkit.metrics.generation import compare_generation_speed
from slimkit.models.causal_lm import max_positions
from slimkit.recipes.measure import MeasureConfig
from slimkit.tasks import LM_TASK


def check_generation(model: torch.nn.Module, task: str, measure: MeasureConfig) -> None:
    """Before any work: prompt plus new tokens must fit the model's positions."""
    gen = measure.generation
    if task != LM_TASK or not (gen.enabled and measure.latency):
        return
    limit = max_positions(model)
    if limit is not None and gen.prompt_tokens + gen.new_tokens > limit:
        raise ConfigError(
            "measure.generation.new_tokens",
            f"prompt_tokens + new_tokens = {gen.prompt_tokens + gen.new_tokens} exceed the model's "
            f"{limit} positions",
        )


def prompt_rows(test_ids: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """``[rows, tokens]`` consecutive pieces of the test token stream (repeated if it is short)."""
    need = rows * tokens
    ids = test_ids.reshape(-1)
    if ids.numel() < need:
        ids = ids.repeat(need // max(ids.numel(), 1) + 1)
    return ids[:need].reshape(rows, tokens)


def measure_generation(snapshots: list[Any], ctx: Any) -> None:
    """Add generation figures to every snapshot that still holds its model (language models only)."""
    gen, m = ctx.measure.generation, ctx.measure
    models = {s.step: s.model for s in snapshots if s.model is not None}
    if ctx.task.task != LM_TASK or not gen.enabled or not models:
        return
    prompts = prompt_rows(ctx.data.test.ids, max(gen.batch_sizes), gen.prompt_tokens)
    if gen.compile:  # the warmup run compiles (checked >= 1 in the config)
        length = gen.prompt_tokens + gen.new_tokens
        models = {step: CompiledDecoding(model, length) for step, model in models.items()}
    speeds = compare_generation_speed(
        models,
        prompts,
        prompt_tokens=gen.prompt_tokens,
        new_tokens=gen.new_tokens,
        batch_sizes=gen.batch_sizes,
        repeats=gen.repeats,
        warmup=gen.warmup,
        threads=m.threads,
    )
    setup = {
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": gen.new_tokens,
        "threads": m.threads,
        "repeats": gen.repeats,
        "decoding": "greedy, static KV cache, compiled step" if gen.compile else "greedy, KV cache",
    }
    for s in snapshots:
        if s.step not in speeds:
            continue
        figures = {}
        for b, speed in speeds[s.step].items():
            figures[f"prefill tok/s b{b}"] = round(speed.prefill_tokens_per_s, 1)
            figures[f"decode tok/s b{b}"] = round(speed.decode_tokens_per_s, 1)
        s.figures["extra"]["generation"] = figures
        s.figures["extra"]["generation_setup"] = setup
    ctx.log.info(
        "generation (tokens/s, %d threads, prompt %d, %d new): %s",
        m.threads,
        gen.prompt_tokens,
        gen.new_tokens,
        {s.step: s.figures["extra"]["generation"] for s in snapshots if s.step in speeds},
    )
