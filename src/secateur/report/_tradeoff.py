"""Render a sweep (``explore.SweepResult``) as a rich table, Markdown and a trade-off figure.

Nothing is computed here but ratios of two measured figures (size and speed against the
baseline's) and the order in which points are drawn.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from .._atomic import atomic_write_bytes
from ..errors import ConfigError
from ._plots import _FORMATS, _matplotlib
from ._render import _md_table

if TYPE_CHECKING:  # a type only: report/ never imports the stages it renders
    from ..explore import SweepResult, TradeoffPoint

HEADER = (
    "setting",
    "score",
    "Δ score",
    "params",
    "non-zeros",
    "MACs",
    "safetensors",
    ".secz",
    "smaller",
    "latency",
    "faster",
    "Pareto",
)


def _bytes(n: int | None) -> str:
    return "–" if n is None else f"{n:,} B"


def _row(result: SweepResult, i: int) -> list[str]:
    p, base = result.points[i], result.baseline
    lat = p.metrics.latency
    base_lat = base.metrics.latency
    return [
        p.label,
        f"{p.score:.4g}",
        "–" if i == 0 else f"{p.score - base.score:+.2f}",
        f"{p.metrics.params:,}",
        f"{p.metrics.nonzero_params:,}",
        f"{p.metrics.macs:,}",
        _bytes(p.metrics.disk_bytes),
        _bytes(p.compressed_bytes),
        f"{base.metrics.disk_bytes / p.stored_bytes:.2f}×" if base.metrics.disk_bytes else "–",
        "–" if lat is None else f"{lat.median_ms:.3f} ms",
        "–" if lat is None or base_lat is None else f"{base_lat.median_ms / lat.median_ms:.2f}×",
        "✓" if i in result.front else "",
    ]


def tradeoff_rows(result: SweepResult) -> list[list[str]]:
    """One row of text per point, baseline first, in :data:`HEADER`'s columns. ``smaller`` is
    the baseline's safetensors bytes over the point's smaller file; ``faster`` the baseline's
    median latency over the point's (both timed in one loop)."""
    return [_row(result, i) for i in range(len(result.points))]


#: The columns the terminal table keeps (the Markdown report has them all).
TERMINAL = (
    "setting",
    "score",
    "Δ score",
    "MACs",
    "smaller",
    "faster",
    "Pareto",
)


def tradeoff_table(result: SweepResult, *, title: str | None = None) -> Table:
    """A rich table of :func:`tradeoff_rows`, narrowed to the :data:`TERMINAL` columns."""
    table = Table(title=title or f"sweep: {result.score_label}, size and latency, all measured")
    keep = [HEADER.index(name) for name in TERMINAL]
    for i in keep:
        table.add_column(HEADER[i], justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in tradeoff_rows(result):
        table.add_row(*(row[i] for i in keep))
    return table


def tradeoff_markdown(
    result: SweepResult,
    *,
    title: str,
    setup: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
    plot_name: str | None = None,
) -> str:
    """A Markdown report: set-up, the measured table with the Pareto front marked, the figure
    (``plot_name``, written beside the report) and notes."""
    lat = result.baseline.metrics.latency
    lines = [f"# {title}", ""]
    if setup:
        lines += _md_table(("setting", "value"), setup) + [""]
    lines += [
        "## Measured trade-off",
        "",
        f"Score: {result.score_label}. `smaller`: the baseline's safetensors file over the "
        "setting's smaller file (safetensors or the lossless `.secz`). `faster`: the baseline's "
        "median latency over the setting's, all models timed in one interleaved loop"
        + (f" ({lat.conditions()})" if lat is not None else "")
        + ". Pareto ✓: no other row is at least as good on score, stored bytes and latency "
        "and better on one of them.",
        "",
    ]
    lines += _md_table(HEADER, tradeoff_rows(result)) + [""]
    if plot_name:
        lines += [f"![accuracy against size and latency]({plot_name})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _series(result: SweepResult) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(result.points[1:], start=1):
        groups.setdefault(p.method, []).append(i)
    return groups


def _panel(ax, result: SweepResult, x_of, xlabel: str, log: bool) -> None:  # noqa: ANN001
    points: Sequence[TradeoffPoint] = result.points
    for k, (method, idx) in enumerate(_series(result).items()):
        order = sorted(idx, key=lambda i: points[i].ratio)
        ax.plot(
            [x_of(points[i]) for i in order],
            [points[i].score for i in order],
            marker="o",
            markersize=4,
            linewidth=1.2,
            color=f"C{k % 10}",
            label=method,
        )
        for i in order:
            ax.annotate(
                f"{points[i].ratio:g}",
                (x_of(points[i]), points[i].score),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.plot(
        [x_of(points[0])], [points[0].score], marker="*", markersize=12, color="black",
        linestyle="none", label="baseline",
    )  # fmt: skip
    front = [i for i in result.front]
    ax.plot(
        [x_of(points[i]) for i in front],
        [points[i].score for i in front],
        marker="o",
        markersize=10,
        markerfacecolor="none",
        markeredgecolor="red",
        linestyle="none",
        label="Pareto front",
    )
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)


def plot_tradeoff(
    result: SweepResult, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Draw score against stored bytes (log scale) and against median latency, one line per
    pruning method with each point labelled by its ratio, the baseline as a star and the Pareto
    front ringed; write it to ``path`` (``.png`` or ``.svg``) atomically.

    Raises:
        ConfigError: another suffix, or matplotlib missing.
        OutputError: the folder cannot be written (nothing half-written is left).
    """
    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot plot to {target}: name the file .png or .svg")
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    size_ax, time_ax = fig.subplots(1, 2, sharey=True)
    _panel(size_ax, result, lambda p: p.stored_bytes, "bytes on disk (smaller file, log)", True)
    lat = result.baseline.metrics.latency
    _panel(
        time_ax,
        result,
        lambda p: p.metrics.latency.median_ms,
        "median latency (ms)" + (f", batch {lat.batch_size}, {lat.device}" if lat else ""),
        False,
    )
    size_ax.set_ylabel(result.score_label)
    time_ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or f"{result.score_label} against size and latency", fontsize=10)
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
    atomic_write_bytes(target, buffer.getvalue())
    return target
