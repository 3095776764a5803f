"""slimkit.report: per-step result tables (text, Markdown, JSON, HTML) and trade-off plots.

``Report.plot`` draws the trade-off plots; ``plot_tradeoff`` and its ``Point``
are in ``slimkit.report.plots``. ``Report.save`` also writes the self-contained
report.html (``slimkit.report.html``), with any extra ``Section`` (a search's
Pareto front, sensitivity tables: ``slimkit.report.sections``).
"""

from slimkit.report.plots import plot_series
from slimkit.report.report import Report, Row
from slimkit.report.sections import Scatter, Section

__all__ = ["Report", "Row", "Scatter", "Section", "plot_series"]
