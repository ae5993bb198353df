"""importance/: score weights (and, later, groups); knows nothing of surgery or schedules."""

from . import _magnitude  # noqa: F401  (registers the built-in criteria)
from ._group import group_l2 as group_l2
from ._registry import WeightCriterion as WeightCriterion
from ._registry import create_criterion as create_criterion
from ._registry import list_criteria as list_criteria
from ._registry import register_criterion as register_criterion

__all__ = ["WeightCriterion", "group_l2", "create_criterion", "list_criteria", "register_criterion"]
