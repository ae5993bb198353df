"""Render what ``secateur export`` measured: one row per model variant, one per file stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from ..measure import Accuracy, Latency


@dataclass(frozen=True)
class VariantFigures:
    """Measured figures of one runnable variant (the checkpoint, or an exported artifact).

    ``None`` means not measured. ``runtime`` names what ran it (PyTorch eager, ONNX Runtime).
    """

    label: str
    runtime: str
    file: str | None
    bytes: int | None
    accuracy: Accuracy | None
    latency: Latency | None


def _variant_cells(rows: Sequence[VariantFigures]) -> list[tuple[str, ...]]:
    base = rows[0]
    out = []
    for row in rows:
        size = f"{row.bytes:,} B" if row.bytes is not None else "–"
        if row.bytes and base.bytes and row is not base:
            size += f" ({base.bytes / row.bytes:.1f}× smaller)"
        acc = f"{row.accuracy.top1:.2%}" if row.accuracy else "–"
        if row.accuracy and base.accuracy and row is not base:
            acc += f" ({(row.accuracy.top1 - base.accuracy.top1) * 100:+.2f} pts)"
        lat = f"{row.latency.median_ms:.3f} ms" if row.latency else "–"
        if row.latency and base.latency and row is not base:
            lat += f" ({base.latency.median_ms / row.latency.median_ms:.2f}× speed)"
        out.append((row.label, row.runtime, size, acc, lat))
    return out


_HEADER = ("variant", "runtime", "file on disk", "top-1 accuracy", "latency, median")


def export_table(rows: Sequence[VariantFigures], *, title: str = "secateur export") -> Table:
    """A rich table of the variants; changes are relative to the first row."""
    table = Table(title=title)
    for name in _HEADER:
        table.add_column(name, justify="left" if name in ("variant", "runtime") else "right")
    for cells in _variant_cells(rows):
        table.add_row(*cells)
    return table


def stages_table(stages: Sequence[tuple[str, int]], *, title: str = "bytes on disk") -> Table:
    """A rich table of (stage, bytes), with each stage's factor against the first."""
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("bytes", justify="right")
    table.add_column("vs dense", justify="right")
    for name, size, factor in _stage_cells(stages):
        table.add_row(name, size, factor)
    return table


def _stage_cells(stages: Sequence[tuple[str, int]]) -> list[tuple[str, str, str]]:
    first = stages[0][1] if stages else 0
    return [
        (name, f"{size:,}", f"{first / size:.1f}× smaller" if size and i else "baseline")
        for i, (name, size) in enumerate(stages)
    ]


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def export_markdown(
    rows: Sequence[VariantFigures],
    *,
    title: str,
    setup: Sequence[tuple[str, str]] = (),
    stages: Sequence[tuple[str, int]] = (),
    notes: Sequence[str] = (),
) -> str:
    """The Markdown report: set-up, variants side by side, file stages, conditions, notes."""
    lines = [f"# {title}", ""]
    if setup:
        lines += _md(("setting", "value"), setup) + [""]
    lines += ["## Variants", ""] + _md(_HEADER, _variant_cells(rows)) + [""]
    if stages:
        lines += ["## Bytes on disk, stage by stage", ""]
        lines += _md(("stage", "bytes", "vs dense"), _stage_cells(stages)) + [""]
    measured = [r for r in rows if r.latency or r.accuracy]
    if measured:
        lines += ["Measured under:", ""]
        for r in measured:
            if r.latency:
                lines.append(f"- {r.label}: latency {r.latency.conditions()}")
            if r.accuracy:
                lines.append(
                    f"- {r.label}: top-1 on {r.accuracy.samples:,} {r.accuracy.split} images"
                )
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
