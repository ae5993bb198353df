"""Helpers shared by the structural-pruning tests: silence units so removing them is exact."""

from __future__ import annotations

import torch
from torch import nn

from secateur.graph import Group, member_slices

PRODUCERS = {
    "conv_out",
    "linear_out",
    "conv1d_out",
    "convT_out",
    "grouped_out",
    "depthwise",
    "norm",
    "layernorm",
    "groupnorm",
    "embedding",
    "param",
    "param_out",
}


def randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that wrongly kept or dropped stats would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@torch.no_grad()
def silence_(model: nn.Module, group: Group, units: torch.Tensor) -> None:
    """Give ``units`` of ``group`` zero influence: every producer writes exactly 0 there."""
    for member in group.members:
        if member.role not in PRODUCERS:
            continue
        module = model.get_submodule(member.module_name)
        idx = group.feature_indices(member, units)
        for name, dim in member_slices(member):
            tensor = getattr(module, name, None)
            if tensor is not None and (
                name in ("weight", "bias") or member.role.startswith("param")
            ):
                tensor.index_fill_(dim, idx, 0.0)


@torch.no_grad()
def silence_readers_(model: nn.Module, group: Group, units: torch.Tensor) -> None:
    """Give ``units`` of ``group`` zero influence from the reading side: every Linear reading
    them gets zero weight there. For multi-query heads, whose key/value head is shared and not
    part of the unit, a silenced query alone still yields the mean of the values."""
    for member in group.members:
        if member.role != "linear_in":
            continue
        module = model.get_submodule(member.module_name)
        idx = group.feature_indices(member, units)
        for name, dim in member_slices(member):
            if name == "weight":
                module.weight.index_fill_(dim, idx, 0.0)


def random_units(group: Group, gen: torch.Generator) -> torch.Tensor:
    count = int(torch.randint(1, max(2, group.size // 2 + 1), (1,), generator=gen))
    return torch.randperm(group.size, generator=gen)[: min(count, group.size - 1)]
