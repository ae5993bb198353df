"""Render before/after ``Metrics`` as a rich table and as a Markdown report."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from ..measure import Metrics
from ._rows import cells


def comparison_table(before: Metrics, after: Metrics, *, title: str = "secateur compress") -> Table:
    """A rich table with one row per measured figure, before, after and the change."""
    table = Table(title=title)
    for name, justify in (
        ("metric", "left"),
        ("before", "right"),
        ("after", "right"),
        ("change", "right"),
    ):
        table.add_column(name, justify=justify)
    for row in cells(before, after):
        table.add_row(*row)
    return table


def conditions(metrics: Metrics) -> list[str]:
    """Lines stating how each figure of ``metrics`` was measured."""
    lines = []
    if metrics.latency is not None:
        lines.append(f"latency: {metrics.latency.conditions()}")
    if metrics.onnx_latency is not None:
        lines.append(
            f"ONNX Runtime latency: {metrics.onnx_latency.conditions()}, timed in the same loop"
        )
    if metrics.accuracy is not None:
        lines.append(
            f"accuracy: top-1 on {metrics.accuracy.samples:,} {metrics.accuracy.split} images"
        )
    lines.append(
        "MACs: per sample, one per weight per output position of Linear/Conv layers and of "
        "weights applied directly (MoE experts: those each token meets); bias, norms, "
        "activations and pooling not counted"
    )
    return lines


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown_report(
    before: Metrics,
    after: Metrics,
    *,
    title: str,
    setup: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> str:
    """A Markdown report: set-up, the comparison table, measurement conditions, per-layer
    sparsity and plain-language notes. Nothing in it is computed here but ratios of figures."""
    lines = [f"# {title}", ""]
    if setup:
        lines += _md_table(("setting", "value"), setup) + [""]
    lines += ["## Before and after", ""]
    lines += _md_table(("metric", "before", "after", "change"), cells(before, after)) + [""]
    lines += ["Measured under:", ""] + [f"- {line}" for line in conditions(after)] + [""]
    if after.layers:
        lines += ["## Per-layer sparsity (after)", ""]
        lines += _md_table(
            ("layer", "weights", "non-zero", "sparsity"),
            [
                (ly.name, f"{ly.params:,}", f"{ly.nonzero:,}", f"{ly.sparsity:.1%}")
                for ly in after.layers
            ],
        ) + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
