"""slimkit.metrics: task metrics, model cost (parameters, MACs, bytes, memory) and latency.

Lower-level pieces (``eval_mode``, ``fixed_threads``, ``file_size``, ``prediction``,
``score_predictions``) are imported from ``slimkit.metrics.modes``, ``.speed``,
``.model`` and ``.task``.
"""

from slimkit.metrics.memory import PeakRSS, rss_bytes
from slimkit.metrics.model import (
    MemoryStats,
    count_macs,
    count_nonzero,
    count_parameters,
    peak_memory,
    saved_size,
)
from slimkit.metrics.speed import (
    LatencyComparison,
    LatencyStats,
    compare_latency,
    measure_latency,
    training_throughput,
)
from slimkit.metrics.task import accuracy, evaluate, macro_f1, pearson, perplexity, spearman

__all__ = [
    "LatencyComparison",
    "LatencyStats",
    "MemoryStats",
    "PeakRSS",
    "accuracy",
    "compare_latency",
    "count_macs",
    "count_nonzero",
    "count_parameters",
    "evaluate",
    "macro_f1",
    "measure_latency",
    "pearson",
    "peak_memory",
    "perplexity",
    "rss_bytes",
    "saved_size",
    "spearman",
    "training_throughput",
]
