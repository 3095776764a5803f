"""slimkit.metrics: task metrics, model cost (parameters, MACs, bytes, memory) and latency."""

from slimkit.metrics.model import (
    MemoryStats,
    count_macs,
    count_nonzero,
    count_parameters,
    file_size,
    peak_memory,
    saved_size,
)
from slimkit.metrics.modes import eval_mode
from slimkit.metrics.speed import (
    LatencyComparison,
    LatencyStats,
    compare_latency,
    fixed_threads,
    measure_latency,
    training_throughput,
)
from slimkit.metrics.task import (
    accuracy,
    evaluate,
    macro_f1,
    pearson,
    perplexity,
    prediction,
    score_predictions,
    spearman,
)

__all__ = [
    "LatencyComparison",
    "LatencyStats",
    "MemoryStats",
    "accuracy",
    "compare_latency",
    "count_macs",
    "count_nonzero",
    "count_parameters",
    "eval_mode",
    "evaluate",
    "file_size",
    "fixed_threads",
    "macro_f1",
    "measure_latency",
    "pearson",
    "peak_memory",
    "perplexity",
    "prediction",
    "saved_size",
    "score_predictions",
    "spearman",
    "training_throughput",
]
