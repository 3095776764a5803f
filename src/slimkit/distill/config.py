"""Distillation settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimkit.config import in_range, non_negative, one_of, positive, positive_int, require

OUTPUT_LOSSES = ("kd", "token_kd", "mse", "cosine", "none")


@dataclass
class DistillConfig:
    """How the student is pulled towards the teacher.

    The loss back-propagated is::

        (1 - alpha) * task_loss + alpha * output_term
          + hidden_weight * hidden_term + attention_weight * attention_term

    ``output_loss`` picks the output term: ``kd`` (soft labels at ``temperature``,
    scaled by T squared) for classifiers, ``token_kd`` for causal language models (the same
    KL per token, averaged over the positions the next-token loss scores, labels != -100;
    :mod:`slimkit.distill.token_kd`), ``mse``/``cosine`` for embedding or
    regression outputs, ``none`` for intermediate-only distillation (then
    ``alpha`` is ignored and the task loss is kept whole).
    ``layer_map`` maps student module names to teacher module names for the
    hidden and attention terms; by default the repeated blocks are matched
    uniformly. Where widths differ a learned linear (or 1x1 conv) projection
    maps the student's features to the teacher's, unless ``projection`` is off,
    in which case differing widths are an error.
    ``cache`` is a file where the teacher's outputs are stored the first time
    each sample is seen and reused afterwards (also across runs). A language model's logits
    (tokens x vocabulary) are too big to cache: ``token_kd`` caches only the teacher's ``top_k``
    log-probabilities per token (KL over those plus one bucket for the rest of the vocabulary);
    ``top_k`` also applies without a cache (the same loss with the teacher run live).
    """

    temperature: float = 4.0
    alpha: float = 0.9
    output_loss: Literal["kd", "token_kd", "mse", "cosine", "none"] = "kd"
    hidden_weight: float = 0.0
    hidden_loss: Literal["mse", "cosine"] = "mse"
    attention_weight: float = 0.0
    layer_map: dict[str, str] | None = None
    projection: bool = True
    cache: str | None = None
    top_k: int | None = None

    def __post_init__(self):
        positive(self.temperature, "temperature")
        in_range(self.alpha, "alpha", 0.0, 1.0)
        one_of(self.output_loss, "output_loss", OUTPUT_LOSSES)
        one_of(self.hidden_loss, "hidden_loss", ("mse", "cosine"))
        non_negative(self.hidden_weight, "hidden_weight")
        non_negative(self.attention_weight, "attention_weight")
        require(
            self.output_loss != "none" or self.hidden_weight > 0 or self.attention_weight > 0,
            "output_loss",
            "'none' needs hidden_weight or attention_weight > 0, or nothing is distilled",
        )
        require(
            not (self.cache and self.attention_weight > 0),
            "cache",
            "attention maps are not cached (they are [heads, tokens, tokens] per sample); "
            "drop attention_weight or the cache",
        )
        if self.top_k is not None:
            positive_int(self.top_k, "top_k")
            require(self.output_loss == "token_kd", "top_k", "applies to output_loss token_kd only")
        require(
            not (self.cache and self.output_loss == "token_kd" and self.top_k is None),
            "cache",
            "a language model's teacher logits (tokens x vocabulary) are too big to cache: "
            "set top_k (e.g. 64) to cache the teacher's top-k, or drop the cache (teacher run live)",
        )
        if self.layer_map is not None:
            require(isinstance(self.layer_map, dict), "layer_map", "must map student to teacher layer names")
            for key, value in self.layer_map.items():
                require(
                    isinstance(key, str) and isinstance(value, str),
                    f"layer_map.{key}",
                    "names must be strings",
                )

    @property
    def uses_layers(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0
