"""slimkit.report: per-step result tables (text, Markdown, JSON) and trade-off plots.

``Report.plot`` draws the trade-off plots; ``plot_tradeoff`` and its ``Point``
are in ``slimkit.report.plots``.
"""

from slimkit.report.plots import plot_series
from slimkit.report.report import Report, Row

__all__ = ["Report", "Row", "plot_series"]
