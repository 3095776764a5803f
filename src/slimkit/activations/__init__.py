"""Activation-function replacement: GELU/SiLU/tanh/sigmoid swapped for cheaper functions.

One verb, ``replace_activations_(model, config) -> ActivationSummary``::

    summary = replace_activations_(model, ReplaceActivationsConfig(to="relu"))        # GELU/SiLU -> ReLU
    replace_activations_(model, ReplaceActivationsConfig(to="pwl", pwl_segments=16))  # any -> 16 segments
    print(summary.table())        # count per kind, new modules, largest |new - old| on [-8, 8]

Activations are found by module type (``nn.GELU``...) and, in Hugging Face models, by the class of
their ``ACT2FN`` modules (``GELUActivation``, ``NewGELUActivation``, ``SiLUActivation``...).
A replaced model keeps its weights file layout (the new modules hold no persistent state): to load
one, build the original model, call ``replace_activations_`` with the same config, then load the
weights. Recovery is ordinary training (fine-tuning, or distillation from the original model).
"""

from slimkit.activations.api import REPLACEMENTS, ActivationSummary, plan_replacements, replace_activations_
from slimkit.activations.config import TARGET_KINDS, ReplaceActivationsConfig
from slimkit.activations.kinds import KINDS, activation_kind, find_activations
from slimkit.activations.modules import HardGELU, PiecewiseLinear

__all__ = [
    "KINDS",
    "REPLACEMENTS",
    "TARGET_KINDS",
    "ActivationSummary",
    "HardGELU",
    "PiecewiseLinear",
    "ReplaceActivationsConfig",
    "activation_kind",
    "find_activations",
    "plan_replacements",
    "replace_activations_",
]
