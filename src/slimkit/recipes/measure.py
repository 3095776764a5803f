"""How every step of a recipe is measured for the report (its own module: the steps read it too)."""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.config import positive_int, require


@dataclass(frozen=True)
class MeasureConfig:
    """How every step is measured for the report."""

    batch_size: int = 64  # latency and MACs are measured on one batch of this size
    threads: int = 2
    warmup: int = 3
    repeats: int = 20
    latency: bool = True
    max_length: int = 128  # text: tokens per sequence

    def __post_init__(self):
        for name in ("batch_size", "threads", "repeats", "max_length"):
            positive_int(getattr(self, name), name)
        require(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "must be an integer >= 0")
