"""report/: tables, text and plots from measured values; computes nothing itself."""

from ._export import VariantFigures as VariantFigures
from ._export import export_markdown as export_markdown
from ._export import export_table as export_table
from ._export import stages_table as stages_table
from ._plan import budget_rows as budget_rows
from ._plan import plan_markdown as plan_markdown
from ._plan import plan_summary as plan_summary
from ._plan import plan_table as plan_table
from ._plots import plot_sensitivity as plot_sensitivity
from ._render import comparison_table as comparison_table
from ._render import conditions as conditions
from ._render import markdown_report as markdown_report
from ._sensitivity import sensitivity_markdown as sensitivity_markdown
from ._sensitivity import sensitivity_table as sensitivity_table
from ._tradeoff import plot_tradeoff as plot_tradeoff
from ._tradeoff import tradeoff_markdown as tradeoff_markdown
from ._tradeoff import tradeoff_rows as tradeoff_rows
from ._tradeoff import tradeoff_table as tradeoff_table

__all__ = [
    "VariantFigures",
    "export_markdown",
    "export_table",
    "stages_table",
    "comparison_table",
    "conditions",
    "markdown_report",
    "plot_sensitivity",
    "sensitivity_markdown",
    "sensitivity_table",
    "plot_tradeoff",
    "budget_rows",
    "plan_markdown",
    "plan_summary",
    "plan_table",
    "tradeoff_markdown",
    "tradeoff_rows",
    "tradeoff_table",
]
