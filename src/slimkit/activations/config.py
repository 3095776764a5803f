"""The config of ``replace_activations_``: what replaces which activations, where."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimkit.activations.kinds import KINDS
from slimkit.config import one_of, require

#: Replacement target -> the kinds it can stand in for. ReLU and hard-swish are ReLU-shaped, so
#: they replace the unbounded GELU/SiLU; hard-sigmoid (with hard-tanh) the bounded sigmoid/tanh;
#: a piecewise-linear table approximates any of them.
TARGET_KINDS: dict[str, tuple[str, ...]] = {
    "relu": ("gelu", "silu"),
    "hardswish": ("gelu", "silu"),
    "hardsigmoid": ("tanh", "sigmoid"),
    "pwl": KINDS,
}
MAX_SEGMENTS = 1024


def _patterns(value: object, name: str) -> None:
    require(isinstance(value, (list, tuple)), name, "must be a list of module-name patterns")
    for i, pattern in enumerate(value):
        require(isinstance(pattern, str) and pattern != "", f"{name}[{i}]", "must be a non-empty string")


@dataclass(frozen=True)
class ReplaceActivationsConfig:
    """Replace activation functions by cheaper ones.

    ``to``: ``relu`` (GELU/SiLU -> ReLU), ``hardswish`` (SiLU -> hard-swish, GELU -> hard-GELU
    ``x * hardsigmoid(1.702 x)``), ``hardsigmoid`` (sigmoid -> hard-sigmoid, tanh -> hard-tanh) or
    ``pwl`` (any of them -> ``pwl_segments`` linear segments). ``from_``: the kinds to replace
    (``gelu``, ``silu``, ``tanh``, ``sigmoid``); None: every kind ``to`` applies to. ``layers`` /
    ``exclude``: fnmatch patterns on module names (a bare name also matches as a suffix); each
    must match an activation of the model.
    """

    to: str = "relu"
    from_: list[str] | None = None
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    pwl_segments: int = 16

    def __post_init__(self) -> None:
        one_of(self.to, "to", TARGET_KINDS)
        if self.from_ is not None:
            require(isinstance(self.from_, (list, tuple)) and self.from_, "from_", "must be a non-empty list")
            for i, kind in enumerate(self.from_):
                one_of(kind, f"from_[{i}]", KINDS)
                require(
                    kind in TARGET_KINDS[self.to],
                    f"from_[{i}]",
                    f"{kind} cannot become {self.to} (it replaces {', '.join(TARGET_KINDS[self.to])})",
                )
            require(len(set(self.from_)) == len(self.from_), "from_", "lists a kind twice")
        _patterns(self.layers, "layers")
        require(len(self.layers) > 0, "layers", "must name at least one pattern ('*': every layer)")
        _patterns(self.exclude, "exclude")
        ok = isinstance(self.pwl_segments, int) and not isinstance(self.pwl_segments, bool)
        require(
            ok and 2 <= self.pwl_segments <= MAX_SEGMENTS,
            "pwl_segments",
            f"must be an integer in [2, {MAX_SEGMENTS}], got {self.pwl_segments!r}",
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds this config replaces."""
        return tuple(self.from_) if self.from_ is not None else TARGET_KINDS[self.to]
