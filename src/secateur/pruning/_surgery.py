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


_RESIZABLE = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def resize_to_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give every resizable module the widths its tensors have in ``state`` (in place).

    Used to load a structurally pruned model into a freshly built full-width one. Only channel
    dims may differ, and only by shrinking (kernel sizes, vocabularies and other dims must match).
    Returns the names of modules resized. Modules of other types are left alone, so a real
    mismatch still surfaces when the state is loaded.

    Raises:
        ValueError: a saved tensor is wider than the module or differs outside channel dims.
    """
    resized = []
    for name, module in model.named_modules():
        if not isinstance(module, _RESIZABLE):
            continue
        changed = False
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            saved = state.get(f"{name}.{tensor_name}" if name else tensor_name)
            if saved is None or saved.shape == tensor.shape:
                continue
            _check_shrink(name, tensor_name, module, tensor.shape, saved.shape)
            new = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, tensor_name, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(tensor_name, new)
            changed = True
        if changed:
            _fix_attributes(module)
            resized.append(name)
    return resized


def _channel_dims(module: nn.Module, tensor_name: str) -> set[int]:
    if isinstance(module, nn.Embedding):
        return {1}
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return {0}  # depthwise: one filter per channel, dim 1 stays 1
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and tensor_name == "weight":
        return {0, 1}
    return {0}


def _check_shrink(
    name: str, tensor_name: str, module: nn.Module, current: torch.Size, saved: torch.Size
) -> None:
    dims = _channel_dims(module, tensor_name)
    if len(current) != len(saved) or any(
        (d in dims and s > c) or (d not in dims and s != c)
        for d, (c, s) in enumerate(zip(current, saved, strict=True))
    ):
        raise ValueError(
            f"{name}.{tensor_name} has shape {tuple(saved)}, which no pruning of {tuple(current)} gives"
        )


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
