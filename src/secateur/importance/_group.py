"""Group criteria: one score per channel unit, aggregated over every coupled layer slice."""

from __future__ import annotations

import torch
from torch import nn

from ..graph import Group, member_slices

WEIGHTED_ROLES = {
    "conv_out",
    "conv_in",
    "linear_out",
    "linear_in",
    "convT_out",
    "convT_in",
    "depthwise",
    "embedding",
    "conv1d_out",
    "conv1d_in",
    "grouped_out",
    "param_out",
}


def _per_index_sq(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    t = tensor.detach().float()
    return t.pow(2).sum(dim=[d for d in range(t.dim()) if d != dim]) if t.dim() > 1 else t.pow(2)


def group_l2(model: nn.Module, group: Group) -> torch.Tensor:
    """L2 norm per unit over all weights that the unit's removal would delete.

    Each weighted member contributes the squared entries of its slices (conv filters for
    producers, input columns for consumers, every spatial copy of a flattened channel); the
    scores are ``sqrt`` of the per-unit sums, shape ``(group.size,)``.
    """
    units = torch.arange(group.size)
    score = torch.zeros(group.size)
    for member in group.members:
        if member.role not in WEIGHTED_ROLES:
            continue
        module = model.get_submodule(member.module_name)
        param_name, dim = member_slices(member)[0]
        per_index = _per_index_sq(getattr(module, param_name), dim).cpu()
        idx = group.feature_indices(member, units).view(group.size, member.factor)
        score += per_index[idx].sum(dim=1)
    return score.sqrt()
