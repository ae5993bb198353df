"""The rows of a before/after comparison, shared by the terminal table and the Markdown report.

Reports compute nothing: every cell is a measured figure from a ``Metrics`` value, or a ratio of
two measured figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..measure import Metrics


@dataclass(frozen=True)
class Row:
    label: str
    get: Callable[[Metrics], float | int | None]
    fmt: Callable[[float | int], str]
    lower_is_better: bool = True


def _int(v: float | int) -> str:
    return f"{int(v):,}"


def _ms(v: float | int) -> str:
    return f"{v:.3f} ms"


ROWS = (
    Row(
        "top-1 accuracy",
        lambda m: m.accuracy.top1 if m.accuracy else None,
        lambda v: f"{v:.2%}",
        False,
    ),
    Row("parameters", lambda m: m.params, _int),
    Row("non-zero parameters", lambda m: m.nonzero_params, _int),
    Row("sparsity", lambda m: m.sparsity, lambda v: f"{v:.1%}", False),
    Row("MACs (dense kernels)", lambda m: m.macs, _int),
    Row("MACs on non-zero weights", lambda m: m.nonzero_macs, _int),
    Row("weights file on disk", lambda m: m.disk_bytes, lambda v: f"{int(v):,} B"),
    Row("latency, median", lambda m: m.latency.median_ms if m.latency else None, _ms),
    Row("latency, p90", lambda m: m.latency.p90_ms if m.latency else None, _ms),
    Row(
        "latency, ONNX Runtime median",
        lambda m: m.onnx_latency.median_ms if m.onnx_latency else None,
        _ms,
    ),
)


def change(row: Row, before: float | int | None, after: float | int | None) -> str:
    """Human-readable change from ``before`` to ``after``: a factor, or points for rates."""
    if before is None or after is None:
        return "not measured"
    if row.label in ("top-1 accuracy", "sparsity"):
        return f"{(after - before) * 100:+.2f} pts"
    if after == 0:
        return "all removed"
    ratio = before / after
    if abs(ratio - 1) < 0.005:
        return "same"
    return f"{ratio:.2f}× smaller" if ratio > 1 else f"{1 / ratio:.2f}× larger"


def cells(before: Metrics, after: Metrics) -> list[tuple[str, str, str, str]]:
    """(label, before, after, change) strings for every row."""
    out = []
    for row in ROWS:
        b, a = row.get(before), row.get(after)
        out.append(
            (
                row.label,
                row.fmt(b) if b is not None else "–",
                row.fmt(a) if a is not None else "–",
                change(row, b, a),
            )
        )
    return out
