"""Render a budget plan (``explore.Plan`` and ``explore.PlanOutcome``) as a rich table and
as Markdown. Nothing is computed here: every figure was measured by the planner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from ._render import _md_table

if TYPE_CHECKING:  # types only: report/ never imports the stages it renders
    from ..explore import Plan, PlanOutcome

#: Each budget limit in words, and the kind of bound it is.
LIMIT_NAMES = {
    "max_file_bytes": ("file on disk (.secz)", "storage"),
    "max_params": ("parameters (dense, in memory)", "memory"),
    "max_macs": ("MACs per sample", "compute"),
    "max_latency_ms": ("median latency (ms)", "compute"),
    "min_speedup": ("speedup over the baseline, one loop", "compute"),
}


def _fmt(limit: str, value: float | None) -> str:
    if value is None:
        return "–"
    if limit == "max_latency_ms":
        return f"{value:.3f}"
    if limit == "min_speedup":
        return f"{value:.2f}×"
    return f"{int(value):,}"


def budget_rows(plan: Plan, outcome: PlanOutcome) -> list[list[str]]:
    """Per set limit: what it bounds, the limit, the baseline's figure, the planned model's
    figure (from the reloaded file) and whether it is met."""
    rows = []
    base = plan.baseline
    base_values = {
        "max_file_bytes": base.file_bytes,
        "max_params": base.params,
        "max_macs": base.macs,
        "max_latency_ms": outcome.baseline_latency.median_ms,
        "min_speedup": 1.0,
    }
    for limit, met in outcome.met.items():
        what, kind = LIMIT_NAMES[limit]
        rows.append(
            [
                f"{what} [{kind}]",
                _fmt(limit, getattr(plan.budget, limit)),
                _fmt(limit, base_values[limit]),
                _fmt(limit, outcome.figures.value(limit)),
                "met" if met else "NOT met",
            ]
        )
    return rows


def plan_summary(plan: Plan, sparsity: float) -> str:
    """The plan in words; ``sparsity`` is the one carried out (above the plan's if tightened)."""
    steps = []
    if plan.shape_method == "channels":
        steps.append(f"channel ratio {plan.ratio:.4f} ({plan.structured.criterion} criterion)")
    elif plan.shape_method == "blocks":
        steps.append(f"residual-block ratio {plan.ratio:.4f} (least influential blocks first)")
    if sparsity > 0:
        tightened = (
            f", tightened from {plan.sparsity:.2%} after recovery"
            if sparsity > plan.sparsity
            else ""
        )
        weights = f"{plan.weights.scope.value} {plan.weights.criterion}"
        steps.append(f"{weights} sparsity {sparsity:.2%}{tightened}")
    steps.append(f"file values {plan.coding.label}")
    return "; ".join(steps)


def _shape_rows(plan: Plan) -> list[list[str]]:
    return [
        [
            p.stage,
            f"{p.setting:.4f}",
            f"{p.figures.params:,}",
            f"{p.figures.macs:,}",
            "–" if p.figures.latency is None else f"{p.figures.latency.median_ms:.3f}",
            "–" if p.figures.speedup is None else f"{p.figures.speedup:.2f}×",
            "–" if p.figures.score is None else f"{p.figures.score:.2f}",
            "✓" if p.stage == plan.shape_method else "",
        ]
        for p in plan.shapes
    ]


def _candidate_rows(plan: Plan) -> list[list[str]]:
    return [
        [
            c.coding or "",
            f"{c.setting:.2%}" if c.fits else f"over even at {c.setting:.0%}",
            f"{c.figures.file_bytes:,}" if c.figures.file_bytes is not None else "–",
            f"{c.figures.score:.2f}" if c.figures.score is not None else "–",
            "✓" if c.fits and c.coding == plan.coding.label else "",
        ]
        for c in plan.candidates
    ]


def plan_markdown(
    plan: Plan,
    outcome: PlanOutcome,
    *,
    title: str,
    baseline_score: float,
    score_label: str,
    selection_label: str = "one-shot score",
    setup: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> str:
    """A Markdown report: set-up, the budget table, the plan in words, the score of both
    models (``baseline_score`` beside the outcome's, both ``score_label``), the codings table
    (their one-shot scores headed ``selection_label``, which may be another split) and notes."""
    lines = [f"# {title}", ""]
    if setup:
        lines += _md_table(("setting", "value"), setup) + [""]
    lines += ["## Budget", ""]
    lines += _md_table(
        ("limit", "budget", "baseline", "planned model (reloaded file)", ""),
        budget_rows(plan, outcome),
    ) + [""]
    lines += [f"Plan: {plan_summary(plan, outcome.sparsity)}.", ""]
    figures = outcome.figures
    lines += [
        f"{score_label}: baseline {baseline_score:.2f} → planned model {figures.score:.2f} "
        f"(the reloaded `.secz` file). Non-zero parameters {figures.nonzero_params:,} of "
        f"{figures.params:,}.",
        "",
    ]
    if plan.shapes:
        lines += [
            "## Narrowing for the parameter, MAC and latency limits",
            "",
            "For each way of narrowing the model, the smallest ratio that meets those limits "
            "(bisection over pruned copies), its figures, and the score of that copy, one-shot, "
            "before any fine-tuning. The best one was carried out.",
            "",
        ]
        lines += _md_table(
            (
                "method",
                "ratio",
                "params",
                "MACs",
                "latency ms",
                "speedup",
                selection_label,
                "chosen",
            ),
            _shape_rows(plan),
        ) + [""]
    if plan.candidates:
        lines += [
            "## Value codings for the file limit",
            "",
            "For each coding, the smallest global sparsity whose file fits (bisection on the "
            "encoded bytes), and the score of that file decoded, one-shot, before any "
            "fine-tuning. The best one was carried out.",
            "",
        ]
        lines += _md_table(
            ("coding", "sparsity", "file bytes", selection_label, "chosen"),
            _candidate_rows(plan),
        ) + [""]
    narrowing = [p for p in plan.probes if p.stage != "weights"]
    lines += [
        "## Notes",
        "",
        f"- {len(plan.probes)} pruned copies were measured in the search "
        f"({len(narrowing)} narrowed, {len(plan.probes) - len(narrowing)} for the file).",
        f"- Latency: the planned model timed interleaved with the baseline "
        f"({figures.latency.conditions()}): {figures.latency.median_ms:.3f} against "
        f"{outcome.baseline_latency.median_ms:.3f} ms.",
    ]
    lines += [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def plan_table(plan: Plan, outcome: PlanOutcome) -> Table:
    """A rich table of :func:`budget_rows`."""
    table = Table(title="secateur plan: budget against measured figures")
    for name in ("limit", "budget", "baseline", "planned (reloaded)", ""):
        table.add_column(name, justify="left" if name == "limit" else "right")
    for row in budget_rows(plan, outcome):
        table.add_row(*row)
    return table
