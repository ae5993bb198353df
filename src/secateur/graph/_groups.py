"""Groups of coupled channels: the units structural pruning removes together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._spaces import Member
from ._trace import trace

# which tensors of a module a role slices, and along which dim
ROLE_SLICES: dict[str, tuple[tuple[str, int], ...]] = {
    "conv_out": (("weight", 0), ("bias", 0)),
    "conv_in": (("weight", 1),),
    "linear_out": (("weight", 0), ("bias", 0)),
    "linear_in": (("weight", 1),),
    "convT_out": (("weight", 1), ("bias", 0)),
    "convT_in": (("weight", 0),),
    "depthwise": (("weight", 0), ("bias", 0)),
    "norm": (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)),
    "embedding": (("weight", 1),),
}
ORIGINS = {"conv_out", "linear_out", "convT_out", "embedding"}


@dataclass(frozen=True)
class Group:
    """``size`` channel units shared by ``members``; unit ``i`` of a member lives at features
    ``offset + i * factor + k`` (``k < factor``) of the member's sliced dims."""

    size: int
    members: tuple[Member, ...]

    def feature_indices(self, member: Member, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``member``'s sliced dims of the given ``units`` (a 1-D long tensor)."""
        k = torch.arange(member.factor)
        return (member.offset + units[:, None] * member.factor + k[None, :]).flatten()

    def module_names(self) -> list[str]:
        return sorted({m.module_name for m in self.members})


@dataclass(frozen=True)
class DependencyGraph:
    """Prunable groups of a model, and the reasons other channel spaces were left alone."""

    groups: tuple[Group, ...]
    blocked: tuple[tuple[str, str], ...]  # (module names, reason)


def build_dependency_graph(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its prunable channel groups.

    A group is every module slice that must lose the same channel indices together: the layers
    writing a space (conv/linear outputs, norms, depthwise convs, all residual operands) and the
    layers reading it, through flatten expansions and concat offsets. Spaces touched by an op
    without a channel rule, model inputs and outputs are reported in ``blocked`` instead.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [g.size for g in build_dependency_graph(net, torch.zeros(1, 4)).groups]
        [8]
    """
    tr = trace(model, example_inputs)
    table = tr.table
    by_root: dict[int, list[Member]] = {}
    for idx in range(len(table.sizes)):
        by_root.setdefault(table.find(idx), []).extend(table.members[idx])
    groups, blocked = [], []
    for root, members in by_root.items():
        if not members:
            continue
        reason = table.root_blocked(root)
        if reason is None and not any(m.role in ORIGINS for m in members):
            reason = "no layer produces these channels"
        names = ", ".join(sorted({m.module_name for m in members}))
        if reason is not None:
            blocked.append((names, reason))
            continue
        groups.append(Group(table.sizes[root], tuple(members)))
    return DependencyGraph(tuple(groups), tuple(blocked))
