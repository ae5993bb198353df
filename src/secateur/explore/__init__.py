"""explore/: questions asked of a trained model before pruning it for real: how sensitive is
each layer, which per-layer ratios meet a global target at the least predicted cost, and what
accuracy each pruning setting trades for bytes and latency (sweeps, Pareto front), and the
least pruning that meets a device's budget (planner).

Sits above ``pruning`` and ``measure`` (it uses both); nothing below imports it.
"""

from ._allocate import allocate_ratios as allocate_ratios
from ._allocate import predicted_drop as predicted_drop
from ._allocate import predicted_savings as predicted_savings
from ._apply_plan import PlanOutcome as PlanOutcome
from ._apply_plan import apply_plan as apply_plan
from ._budget import LATENCY_MARGIN as LATENCY_MARGIN
from ._budget import Budget as Budget
from ._plan import SHAPE_METHODS as SHAPE_METHODS
from ._plan import Plan as Plan
from ._plan import plan_for_budget as plan_for_budget
from ._sensitivity import DEFAULT_RATIOS as DEFAULT_RATIOS
from ._sensitivity import LayerCurve as LayerCurve
from ._sensitivity import SensitivityMethod as SensitivityMethod
from ._sensitivity import SensitivityResult as SensitivityResult
from ._sensitivity import check_ratios as check_ratios
from ._sensitivity import sensitivity_scan as sensitivity_scan
from ._tradeoff import SweepResult as SweepResult
from ._tradeoff import TradeoffPoint as TradeoffPoint
from ._tradeoff import pareto_front as pareto_front
from ._tradeoff import sweep as sweep

__all__ = [
    "LATENCY_MARGIN",
    "SHAPE_METHODS",
    "Budget",
    "Plan",
    "PlanOutcome",
    "apply_plan",
    "plan_for_budget",
    "DEFAULT_RATIOS",
    "LayerCurve",
    "SensitivityMethod",
    "SensitivityResult",
    "SweepResult",
    "TradeoffPoint",
    "allocate_ratios",
    "check_ratios",
    "pareto_front",
    "predicted_drop",
    "predicted_savings",
    "sensitivity_scan",
    "sweep",
]
