"""How every step of a recipe is measured for the report (its own module: the steps read it too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimkit.config import positive_int, require


@dataclass(frozen=True)
class GenerationMeasure:
    """Language models only: greedy decoding speed with the KV cache, timed beside latency.

    Prefill tokens/s (a prompt of ``prompt_tokens``) and decode tokens/s (``new_tokens`` one-token
    steps) at each batch size, medians of ``repeats`` runs after ``warmup``, all steps interleaved.
    ``compile``: decode through a static KV cache with the one-token step compiled by
    ``torch.compile`` (:mod:`slimkit.metrics.compiled`; the warmup run compiles, about a minute per
    step and batch size for a 135M model, needs a C++ compiler) instead of eager.
    """

    enabled: bool = True
    prompt_tokens: int = 128
    new_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 3
    warmup: int = 1
    compile: bool = False

    def __post_init__(self):
        for name in ("enabled", "compile"):
            require(isinstance(getattr(self, name), bool), name, "must be true or false")
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            positive_int(getattr(self, name), name)
        require(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "must be an integer >= 0")
        require(
            not self.compile or self.warmup >= 1, "warmup", "compile: true needs warmup >= 1 (it compiles)"
        )
        require(len(self.batch_sizes) > 0, "batch_sizes", "must list at least one batch size")
        for i, size in enumerate(self.batch_sizes):
            positive_int(size, f"batch_sizes[{i}]")


@dataclass(frozen=True)
class MeasureConfig:
    """How every step is measured for the report."""

    batch_size: int = 64  # latency and MACs are measured on one batch of this size
    threads: int = 2
    warmup: int = 3
    repeats: int = 20
    latency: bool = True
    max_length: int = 128  # text: tokens per sequence
    generation: GenerationMeasure = field(default_factory=GenerationMeasure)  # language models only

    def __post_init__(self):
        for name in ("batch_size", "threads", "repeats", "max_length"):
            positive_int(getattr(self, name), name)
        require(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "must be an integer >= 0")
