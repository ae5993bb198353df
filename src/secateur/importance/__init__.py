"""importance/: score weights and channel units; knows groups, not surgery or schedules.

A criterion (:class:`Criterion`) scores each weight; :func:`weight_scores` applies it to layers
and :func:`group_scores` adds the scores up over each channel unit of a dependency-graph group.
Data criteria gather their calibration statistics through :func:`collect_statistics`.
"""

from . import _builtin  # noqa: F401  (registers the built-in criteria)
from ._criterion import Criterion as Criterion
from ._criterion import WeightContext as WeightContext
from ._registry import WeightCriterion as WeightCriterion
from ._registry import as_criterion as as_criterion
from ._registry import create_criterion as create_criterion
from ._registry import list_criteria as list_criteria
from ._registry import register_criterion as register_criterion
from ._scoring import NORMALIZATIONS as NORMALIZATIONS
from ._scoring import group_scores as group_scores
from ._scoring import normalize as normalize
from ._scoring import weight_scores as weight_scores
from ._statistics import FeatureStats as FeatureStats
from ._statistics import Statistics as Statistics
from ._statistics import collect_statistics as collect_statistics

__all__ = [
    "NORMALIZATIONS",
    "Criterion",
    "FeatureStats",
    "Statistics",
    "WeightContext",
    "WeightCriterion",
    "as_criterion",
    "collect_statistics",
    "create_criterion",
    "group_scores",
    "list_criteria",
    "normalize",
    "register_criterion",
    "weight_scores",
]
