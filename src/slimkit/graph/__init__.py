"""The traced dependency graph: shared machinery for every technique that needs a model's wiring.

``trace_model`` records one ordinary forward pass (every torch function call
and every leaf module call, with the tensors they read and wrote);
``propagate`` follows one dimension of one tensor through that record
(residual adds, concatenations, reshapes into heads); ``build_groups`` turns it
into coupled groups of units that must be removed together. Structured pruning
and BatchNorm folding both read this package; neither imports the other.
"""

from slimkit.graph.groups import Group, build_groups
from slimkit.graph.trace import Trace, trace_model

__all__ = ["Group", "Trace", "build_groups", "trace_model"]
