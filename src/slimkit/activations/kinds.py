"""Finding a model's activation functions: by module type, and by role in Hugging Face models.

PyTorch models hold ``nn.GELU`` / ``nn.SiLU`` / ``nn.Tanh`` / ``nn.Sigmoid`` modules. Hugging Face
models build theirs with ``ACT2FN[config.hidden_act]``, which gives modules of
``transformers.activations`` (``GELUActivation``, ``NewGELUActivation``, ``GELUTanh``,
``SiLUActivation``, ...): they are matched by their class (and subclasses), never by where they sit
in a model, so every architecture that uses ``ACT2FN`` is covered without a list of model paths.
An activation that a model calls as a function inside ``forward`` (``F.gelu(x)``) is no module and
cannot be swapped: it is not found.
"""

from __future__ import annotations

import sys

from torch import nn

#: The kinds of activation that can be replaced, in the order tables list them.
KINDS = ("gelu", "silu", "tanh", "sigmoid")

TORCH_KINDS: dict[type[nn.Module], str] = {
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}

# transformers.activations class names -> kind. Every GELU flavour (erf, tanh approximations,
# x * sigmoid(1.702 x)) is "gelu": the replacement approximates the module's own function.
# ClippedGELUActivation is left out on purpose: its clipping exists for int8 ranges, which a
# replacement would silently drop.
HF_KINDS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu",
    "FastGELUActivation": "gelu",
    "GELUTanh": "gelu",
    "PytorchGELUTanh": "gelu",
    "AccurateGELUActivation": "gelu",
    "QuickGELUActivation": "gelu",
    "SiLUActivation": "silu",
}


def _hf_classes() -> dict[type, str]:
    """The ACT2FN classes of the transformers version in use; none when transformers is not loaded
    (then no model can hold one, and ``import slimkit`` must not load transformers)."""
    module = sys.modules.get("transformers.activations")
    if module is None and "transformers" not in sys.modules:
        return {}
    if module is None:
        import transformers.activations as module
    found = {getattr(module, name, None): kind for name, kind in HF_KINDS.items()}
    return {cls: kind for cls, kind in found.items() if isinstance(cls, type)}


def activation_kind(module: nn.Module, hf: dict[type, str] | None = None) -> str | None:
    """The kind of ``module`` (``gelu``, ``silu``, ``tanh``, ``sigmoid``), or None if it is none of them."""
    table = {**TORCH_KINDS, **(_hf_classes() if hf is None else hf)}
    return next((table[cls] for cls in type(module).__mro__ if cls in table), None)


def find_activations(model: nn.Module) -> dict[str, str]:
    """Every replaceable activation module of ``model``: ``{module name: kind}``, in model order.

    The model is only read. A module held under two names appears under both.
    """
    hf = _hf_classes()
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        kind = activation_kind(module, hf) if name else None
        if kind is not None:
            found[name] = kind
    return found
