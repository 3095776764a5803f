"""What ``quantize_`` and ``convert_`` did to a model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuantSummary:
    """The result of :func:`~slimkit.quant.quantize_` / :func:`~slimkit.quant.convert_` (module names as keys).

    ``quantized``: layer -> what it became (the new module's ``extra_repr``);
    ``skipped``: layer -> why it stays float; ``folded``: BatchNorm -> the conv
    it was folded into; ``prepared``: layers fake-quantized by a training method
    (QAT), waiting for training and ``convert_``; ``analysis``: mixed
    precision's per-layer sensitivity and choice (``sensitivity``, ``order``,
    ``high``, ``trace``), else None.
    """

    method: str
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, str] = field(default_factory=dict)
    analysis: dict | None = None
