"""Physical removal: rebuild parameters, buffers and attributes without the pruned channels."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..graph import ROLE_SLICES, Group

_OUT_ATTR = {nn.Linear: "out_features", nn.Embedding: "embedding_dim"}
_IN_ATTR = {nn.Linear: "in_features"}


def _select(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, keep.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new)


def _fix_attributes(module: nn.Module) -> None:
    """Set width attributes from the (already sliced) weight so the module runs and saves."""
    w = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = w.shape[1]
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:  # depthwise: one filter per channel
            module.in_channels = module.out_channels = module.groups = w.shape[0]
        else:
            module.out_channels, module.in_channels = w.shape[0], w.shape[1]
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = w.shape[0]


def remove_units_(model: nn.Module, removals: list[tuple[Group, torch.Tensor]]) -> None:
    """Remove ``units`` (1-D long tensors) of each group from ``model`` in place.

    All removals are gathered per (module, tensor, dim) first and applied once, so a module that
    reads one group and writes another, or reads several groups through a concat, is sliced in
    its original coordinates.
    """
    drop: dict[tuple[str, str, int], set[int]] = defaultdict(set)
    for group, units in removals:
        if units.numel() == 0:
            continue
        for member in group.members:
            idx = group.feature_indices(member, units.cpu()).tolist()
            for tensor_name, dim in ROLE_SLICES[member.role]:
                drop[(member.module_name, tensor_name, dim)].update(idx)
    touched = set()
    for (module_name, tensor_name, dim), indices in drop.items():
        module = model.get_submodule(module_name)
        tensor = getattr(module, tensor_name, None)
        if tensor is None:
            continue
        keep = torch.tensor(sorted(set(range(tensor.shape[dim])) - indices), dtype=torch.long)
        _select(module, tensor_name, dim, keep)
        touched.add(module_name)
    for module_name in touched:
        _fix_attributes(model.get_submodule(module_name))
