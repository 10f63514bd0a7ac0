"""Reports: typed report objects written as JSON, Markdown and a plot, by one writer."""

from prunekit.reporting.figures import new_figure, save_figure
from prunekit.reporting.writer import Report, write_report

__all__ = ["Report", "new_figure", "save_figure", "write_report"]
