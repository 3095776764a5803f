"""slimkit.report: per-step result tables (text, Markdown, JSON) and trade-off plots."""

from slimkit.report.plots import Point, plot_series, plot_tradeoff
from slimkit.report.report import Report, Row

__all__ = ["Point", "Report", "Row", "plot_series", "plot_tradeoff"]
