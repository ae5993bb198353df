"""report/: tables and text from ``Metrics`` values; computes nothing itself."""

from ._render import comparison_table as comparison_table
from ._render import conditions as conditions
from ._render import markdown_report as markdown_report

__all__ = ["comparison_table", "conditions", "markdown_report"]
