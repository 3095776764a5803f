"""Human-readable numbers for report tables; a missing figure (None, NaN) shows as ``-``."""

from __future__ import annotations

import math
from typing import Any

MISSING = "-"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_bytes(value: float | None) -> str:
    """Decimal units: ``950 B``, ``12.3 KB``, ``1.07 MB``, ``2.50 GB``."""
    if _missing(value):
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= scale:
            return (
                f"{value / scale:#.3g} {unit}" if abs(value) < 100 * scale else f"{value / scale:.0f} {unit}"
            )
    return f"{value:.0f} B"


def format_count(value: float | None) -> str:
    """Parameter and MAC counts: ``950``, ``266.6K``, ``22.71M``, ``1.20G``."""
    if _missing(value):
        return MISSING
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.2f}{unit}" if abs(scaled) < 100 else f"{scaled:.1f}{unit}"
    return f"{value:.0f}"


def format_ms(value: float | None) -> str:
    """Three significant digits: ``0.0123 ms``, ``1.23 ms``, ``123 ms``, ``1234 ms``."""
    if _missing(value):
        return MISSING
    if abs(value) >= 100:
        return f"{value:.0f} ms"
    return f"{value:#.3g} ms"


def format_ratio(value: float | None) -> str:
    """``3.12x``."""
    if _missing(value):
        return MISSING
    return f"{value:.2f}x" if math.isfinite(value) else "infx"


def format_percent(value: float | None) -> str:
    """A fraction as a percentage: 0.9 -> ``90.0%``."""
    if _missing(value):
        return MISSING
    return f"{100 * value:.1f}%"


def format_metric(value: Any) -> str:
    """Task metrics: four decimals below 100 (accuracy 0.9812), one above (perplexity 123.4)."""
    if _missing(value):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):  # counts that come with a metric (tokens scored, seq_len)
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def format_rate(value: float | None) -> str:
    """Tokens per second and other rates: one decimal (``23.4``)."""
    if _missing(value):
        return MISSING
    return f"{value:.1f}"


def format_delta(value: float | None) -> str:
    """Signed change of a metric: ``+0.0012``, ``-0.0150``."""
    if _missing(value):
        return MISSING
    return f"{value:+.4f}" if abs(value) < 100 else f"{value:+.1f}"
