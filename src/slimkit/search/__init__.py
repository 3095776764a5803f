"""Accuracy-aware compression search: a metric floor and an objective in, the best model out.

    from slimkit.search import FloorConfig, SearchConfig, search
    result = search(model, task, data, SearchConfig(floor=FloorConfig(within=0.01), objective="latency"))
    print(result.front_table()); result.model  # the chosen model (the input model is unchanged)

The search sits above the techniques (it calls ``prune_``, ``quantize_`` and ``distill_`` with
their config types) and below the recipes (the ``search`` step, ``slimkit search``).
"""

from slimkit.search.api import search
from slimkit.search.config import BudgetConfig, FloorConfig, RecoveryConfig, SearchConfig, SpaceConfig
from slimkit.search.result import Evaluation, SearchResult, pareto_front
from slimkit.search.space import Candidate

__all__ = [
    "BudgetConfig",
    "Candidate",
    "Evaluation",
    "FloorConfig",
    "RecoveryConfig",
    "SearchConfig",
    "SearchResult",
    "SpaceConfig",
    "pareto_front",
    "search",
]
