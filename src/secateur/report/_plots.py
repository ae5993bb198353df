"""Figures from measured values: the sensitivity curves of a scan (drop against ratio).

Needs matplotlib (the ``plot`` extra). Figures are drawn on matplotlib's Agg canvas directly,
without pyplot, so no global backend is set and nothing opens a window. Nothing is computed here
but the order in which layers are labeled.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._atomic import atomic_write_bytes
from ..errors import ConfigError

if TYPE_CHECKING:  # a type only: report/ never imports the stages it draws
    from ..explore import SensitivityResult

#: Layers drawn in colour with their own legend entry; the rest are grey.
MAX_LABELED = 12
_FORMATS = {".png": "png", ".svg": "svg"}


def _matplotlib():  # noqa: ANN202
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib: pip install 'secateur[plot]' (or matplotlib>=3.7)"
        ) from None
    return matplotlib, Figure, FigureCanvasAgg


def _x_label(result: SensitivityResult) -> str:
    if result.cost_unit == "weights":
        return "weights zeroed in the layer (% of the layer's weights)"
    return "units removed from the group (% of its channels, neurons or heads)"


def plot_sensitivity(
    result: SensitivityResult, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Draw one line per layer, score drop against ratio, and write it to ``path`` atomically.

    Lines are the measured points of :class:`secateur.explore.SensitivityResult` (drop =
    baseline − score, so higher is worse). With more than ``MAX_LABELED`` layers, only the most
    sensitive (largest mean drop over the scanned ratios) are coloured and named in the legend.

    Args:
        result: a sensitivity scan.
        path: ``.png`` (150 dpi) or ``.svg``; the format follows the suffix.
        title: defaults to the method, criterion and baseline score.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: another suffix, or matplotlib missing.
        OutputError: the folder cannot be written (nothing half-written is left).

    Example:
        >>> plot_sensitivity(scan, "out/sensitivity.png")  # doctest: +SKIP
        PosixPath('out/sensitivity.png')
    """
    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot plot to {target}: name the file .png or .svg")
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()

    xs = [100.0 * r for r in result.ratios]
    mean_drop = {ly.name: sum(ly.drops) / len(ly.drops) for ly in result.layers}
    ranked = sorted(result.layers, key=lambda ly: mean_drop[ly.name], reverse=True)
    labeled = {ly.name for ly in ranked[:MAX_LABELED]}
    others = len(result.layers) - len(labeled)

    fig = Figure(figsize=(9.0, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhline(0.0, color="black", linewidth=0.8)
    grey_labeled = False
    for layer in result.layers:  # model order, so grey lines sit under the coloured ones
        if layer.name in labeled:
            continue
        ax.plot(
            xs,
            layer.drops,
            color="0.75",
            linewidth=0.8,
            label=None if grey_labeled else f"{others} less sensitive layers",
        )
        grey_labeled = True
    colors = [f"C{i % 10}" for i in range(MAX_LABELED)]
    styles = ["-", "--"]
    for i, layer in enumerate(ranked[:MAX_LABELED]):
        ax.plot(
            xs,
            layer.drops,
            marker="o",
            markersize=3.5,
            linewidth=1.6,
            color=colors[i],
            linestyle=styles[i // 10],
            label=f"{layer.name} ({layer.size:,} {'weights' if layer.kind == 'weights' else 'units'})",
        )
    ax.set_xlabel(_x_label(result))
    ax.set_ylabel(f"drop in {result.score_label}: baseline − pruned")
    ax.set_xlim(0.0, 100.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        title
        or f"{result.method.value} sensitivity, {result.criterion} criterion: "
        f"baseline {result.score_label} {result.baseline:.4g}",
        fontsize=10,
    )
    handles, labels = ax.get_legend_handles_labels()
    if grey_labeled:  # drawn first (underneath), listed last
        handles, labels = handles[1:] + handles[:1], labels[1:] + labels[:1]
    ax.legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )

    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    # SVG text stays text (searchable, editable) rather than glyph outlines
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
    atomic_write_bytes(target, buffer.getvalue())
    return target
