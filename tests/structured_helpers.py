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
    "pergroup_out",
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
        idx = group.slice_indices(member, units)
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


def _outputs(model: nn.Module, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """``model``'s output on ``x`` (keyword tensors for a dict); an HF output's logits."""
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def assert_silenced_removal_exact(
    model: nn.Module,
    x: torch.Tensor | dict[str, torch.Tensor],
    seed: int = 0,
    *,
    skip: tuple[str, ...] = ("hidden",),
    tol: float = 1e-5,
) -> list[tuple[Group, torch.Tensor]]:
    """Silence a random subset of every group of ``model``'s graph not of a ``skip`` kind
    (norms pool ``hidden`` channels: their removal is not exact by nature), remove exactly
    those units, and check that the outputs did not move. Returns the removals."""
    from secateur.graph import build_dependency_graph
    from secateur.pruning._structured import apply_removals_

    graph = build_dependency_graph(model, x)
    gen = torch.Generator().manual_seed(seed)
    removals = [(g, random_units(g, gen)) for g in graph.groups if g.kind not in skip]
    assert removals, "no group to remove"
    for group, units in removals:
        silence_(model, group, units)
    expected = _outputs(model, x)
    apply_removals_(model, graph, removals)
    torch.testing.assert_close(_outputs(model, x), expected, atol=tol, rtol=tol)
    return removals
