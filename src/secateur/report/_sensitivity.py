"""Render a sensitivity scan (and a per-layer allocation) as a rich table and as Markdown.

Nothing is computed here: drops are the scan's measured values; allocation rows read the
scan's own interpolation (``SensitivityResult.drop`` / ``cost``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from ._render import _md_table

if TYPE_CHECKING:  # a type only: report/ never imports the stages it renders
    from ..explore import SensitivityResult


def _num(value: float) -> str:
    return f"{value:.4g}"


def _unit(result: SensitivityResult) -> str:
    return "weights" if result.cost_unit == "weights" else "units"


def _header(result: SensitivityResult, allocation: Mapping[str, float] | None) -> list[str]:
    cols = ["layer", "kind", "size"] + [f"r={r:g}" for r in result.ratios]
    if allocation is not None:
        cols.append("allocated")
    return cols


def _rows(result: SensitivityResult, allocation: Mapping[str, float] | None) -> list[list[str]]:
    rows = []
    for layer in result.layers:
        row = [layer.name, layer.kind, f"{layer.size:,} {_unit(result)}"]
        row += [_num(d) for d in layer.drops]
        if allocation is not None:
            row.append(f"{allocation.get(layer.name, 0.0):.3f}")
        rows.append(row)
    return rows


def sensitivity_table(
    result: SensitivityResult,
    allocation: Mapping[str, float] | None = None,
    *,
    title: str | None = None,
) -> Table:
    """A rich table: one row per layer, its score drop at each scanned ratio (baseline −
    pruned, in the score's unit), and its allocated ratio when ``allocation`` is given."""
    table = Table(
        title=title
        or f"drop in {result.score_label} when one layer alone is pruned "
        f"(baseline {_num(result.baseline)})"
    )
    for i, name in enumerate(_header(result, allocation)):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in _rows(result, allocation):
        table.add_row(*row)
    return table


def allocation_rows(
    result: SensitivityResult, allocation: Mapping[str, float]
) -> list[tuple[str, str, str, str]]:
    """``(layer, ratio, predicted drop, predicted saving)`` per layer, as text."""
    unit = result.cost_unit
    return [
        (
            name,
            f"{ratio:.4f}",
            _num(result.drop(name, ratio)),
            f"{round(result.cost(name, ratio)):,} {unit}",
        )
        for name, ratio in allocation.items()
    ]


def sensitivity_markdown(
    result: SensitivityResult,
    *,
    title: str,
    setup: Sequence[tuple[str, str]] = (),
    allocation: Mapping[str, float] | None = None,
    allocation_summary: Sequence[str] = (),
    notes: Sequence[str] = (),
    plot_name: str | None = None,
) -> str:
    """A Markdown report: set-up, the drop table, the allocation (when given) with its summary
    lines, and notes. ``plot_name`` embeds an image written beside the report."""
    lines = [f"# {title}", ""]
    if setup:
        lines += _md_table(("setting", "value"), setup) + [""]
    lines += [
        f"## Drop in {result.score_label} when one layer alone is pruned",
        "",
        f"Baseline: {_num(result.baseline)}. Each cell is baseline − score with only that "
        f"{'layer' if result.cost_unit == 'weights' else 'group'} pruned at ratio r "
        f"({result.criterion} criterion); higher is more sensitive.",
        "",
    ]
    lines += _md_table(_header(result, None), _rows(result, None)) + [""]
    if plot_name:
        lines += [f"![sensitivity curves]({plot_name})", ""]
    if allocation is not None:
        lines += ["## Allocated per-layer ratios", ""]
        lines += _md_table(
            ("layer", "ratio", "predicted drop", "predicted saving"),
            allocation_rows(result, allocation),
        ) + [""]
        lines += [f"- {line}" for line in allocation_summary] + [""]
        lines += [
            "Usable as `per_layer=` of "
            + ("`UnstructuredConfig`" if result.cost_unit == "weights" else "`StructuredConfig`")
            + ":",
            "",
            "```python",
            "per_layer = {" + ", ".join(f"{n!r}: {r:g}" for n, r in allocation.items()) + "}",
            "```",
            "",
        ]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
