"""graph/: trace a model once and find the groups of coupled channels (knows nothing of scores)."""

from ._filter_extras import can_shrink_per_group as can_shrink_per_group
from ._groups import KINDS as KINDS
from ._groups import ROLE_SLICES as ROLE_SLICES
from ._groups import DependencyGraph as DependencyGraph
from ._groups import Group as Group
from ._groups import WidthAttribute as WidthAttribute
from ._groups import build_dependency_graph as build_dependency_graph
from ._groups import member_slices as member_slices
from ._spaces import Member as Member

__all__ = [
    "KINDS",
    "ROLE_SLICES",
    "DependencyGraph",
    "Group",
    "Member",
    "WidthAttribute",
    "build_dependency_graph",
    "can_shrink_per_group",
    "member_slices",
]
