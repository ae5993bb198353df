"""Physical removal: rebuild parameters, buffers and attributes without the pruned channels."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from ..graph import Group, member_slices
from ..graph._trace import is_hf_conv1d
from ._attention import PrunedMultiheadAttention, decouple_heads_
from ._buffer_slices import is_unsaved_buffer, record_buffer_slice_

_RESIZABLE = (
    nn.Linear,
    nn.Embedding,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.MultiheadAttention,
)


def resize_to_state_(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    groups: Mapping[str, int] | None = None,
) -> list[str]:
    """Give every module the widths its tensors have in ``state`` (in place).

    Used to load a structurally pruned model into a freshly built full-width one. Known layer
    types may shrink only along channel dims (kernel sizes, vocabularies must match); a free
    1-D+ parameter of another module type may shrink along any dim. ``groups`` holds the
    saved group counts of grouped convs and GroupNorms (the manifest's ``"groups"`` edit);
    for one it does not name, whole groups went, unless a grouped conv's weight holds fewer
    inputs per group (then every group shrank alike). Returns the names of modules resized;
    a real mismatch still surfaces when the state is loaded.

    Raises:
        ValueError: a saved tensor is wider than the module or differs outside channel dims.
    """
    groups = groups or {}
    resized = []
    for name, module in model.named_modules():
        changed = False
        recorded = groups.get(name)
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            saved = state.get(f"{name}.{tensor_name}" if name else tensor_name)
            if saved is None or saved.shape == tensor.shape:
                continue
            _check_shrink(name, tensor_name, module, tensor.shape, saved.shape)
            new = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            _assign(module, tensor_name, tensor, new)
            changed = True
        if changed:
            _fix_attributes(module, groups=_saved_groups(name, module, state, recorded))
            resized.append(name)
        elif recorded is not None and recorded != group_count(module):
            raise ValueError(f"{name} keeps its width but its saved group count is {recorded}")
    return resized


def group_count(module: nn.Module) -> int | None:
    """A grouped conv's ``groups`` or a GroupNorm's ``num_groups``; None for other modules."""
    if _is_grouped(module):
        return module.groups
    return module.num_groups if isinstance(module, nn.GroupNorm) else None


def _saved_groups(
    name: str, module: nn.Module, state: Mapping[str, torch.Tensor], recorded: int | None
) -> int | None:
    """The group count of a resized grouped conv or GroupNorm: the manifest's, checked against
    the saved widths, or else the one its tensors imply (whole groups went, unless a grouped
    conv's weight holds fewer inputs per group: then every group shrank alike)."""
    count = group_count(module)
    if count is None:
        return None
    if recorded is not None:
        width = module.weight.shape[0] if _is_grouped(module) else _width(module, "weight", 0)
        if width and width % recorded:
            raise ValueError(f"{name} has {width} channels, which {recorded} groups do not divide")
        return recorded
    if isinstance(module, nn.GroupNorm):
        return None  # the whole-groups rule of _fix_attributes
    saved = state.get(f"{name}.weight" if name else "weight")
    if saved is not None and saved.shape[1] != module.in_channels // module.groups:
        return module.groups
    return _whole_groups(module)


def _assign(module: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, name, new)
    else:  # a buffer stays in or out of the saved state
        module.register_buffer(name, new, persistent=not is_unsaved_buffer(module, name))
    return new


def _is_grouped(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not isinstance(module, nn.modules.conv._ConvTransposeNd)
        and module.groups > 1
    )


def _whole_groups(module: nn.Module) -> int:
    """A grouped conv's group count once whole groups went: its (sliced) filters over the
    filters per group it had."""
    return module.weight.shape[0] // (module.out_channels // module.groups)


def _channel_dims(module: nn.Module, tensor_name: str, ndim: int) -> set[int]:
    if isinstance(module, nn.Embedding):
        return {1}
    if isinstance(module, PrunedMultiheadAttention):
        # its head count (the inner width) came from the manifest's "attention" edit already
        return {1} if tensor_name == "in_proj_weight" else set()
    if isinstance(module, nn.MultiheadAttention):
        return set(range(ndim))  # saved before heads were decoupled: both widths shrank together
    if _is_grouped(module):
        return {0, 1}  # dim 1: a group's inputs, fewer when every group shrank alike
    if (isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_hf_conv1d(module)) and (
        tensor_name == "weight"
    ):
        return {0, 1}
    if isinstance(module, (*_RESIZABLE,)) or is_hf_conv1d(module):
        return {0}
    return set(range(ndim))  # a free parameter: any axis may have been a channel axis


def _check_shrink(
    name: str, tensor_name: str, module: nn.Module, current: torch.Size, saved: torch.Size
) -> None:
    dims = _channel_dims(module, tensor_name, len(current))
    if len(current) != len(saved) or any(
        (d in dims and s > c) or (d not in dims and s != c)
        for d, (c, s) in enumerate(zip(current, saved, strict=True))
    ):
        raise ValueError(
            f"{name}.{tensor_name} has shape {tuple(saved)}, which no pruning of {tuple(current)} gives"
        )


def _fix_attributes(module: nn.Module, dropped: int = 0, groups: int | None = None) -> None:
    """Set width attributes from the (already sliced) tensors so the module runs and saves.

    ``dropped`` is the number of channels removed, for norms without affine tensors; ``groups``
    a grouped conv's new group count, when not its own.
    """
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif is_hf_conv1d(module):
        module.nx, module.nf = w.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = w.shape[1]
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        if groups is not None:
            module.groups = groups
        module.out_channels, module.in_channels = w.shape[0], module.groups * w.shape[1]
    elif isinstance(module, PrunedMultiheadAttention):  # whole heads go: head_dim stays
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.num_heads = module.in_proj_weight.shape[0] // (3 * module.head_dim)
    elif isinstance(module, nn.MultiheadAttention):  # a model saved before heads were decoupled
        width = module.in_proj_weight.shape[1]
        module.embed_dim = module.kdim = module.vdim = width
        module.head_dim = width // module.num_heads
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = _width(module, "running_mean", module.num_features - dropped)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        width = _width(module, "weight", module.normalized_shape[-1] - dropped)
        module.normalized_shape = (*module.normalized_shape[:-1], width)
    elif isinstance(module, nn.GroupNorm):
        width = _width(module, "weight", module.num_channels - dropped)
        if groups is not None:
            module.num_groups = groups
        elif module.num_groups > 1:  # whole groups went
            per_group = module.num_channels // module.num_groups
            module.num_groups = width // per_group
        module.num_channels = width


def _width(module: nn.Module, tensor_name: str, fallback: int) -> int:
    tensor = getattr(module, tensor_name, None)
    return tensor.shape[0] if tensor is not None else fallback


def remove_units_(
    model: nn.Module,
    removals: list[tuple[Group, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Remove ``units`` (1-D long tensors) of each group from ``model`` in place.

    All removals are gathered per (module, tensor, dim) first and applied once, so a module that
    reads one group and writes another, or reads several groups through a concat, is sliced in
    its original coordinates. A parameter shared by several modules (tied embeddings) is sliced
    once and stays shared. When ``optimizer`` is given, its per-parameter state (momentum,
    Adam moments) is sliced the same way and its parameter groups point at the new tensors.
    """
    drop: dict[tuple[str, str, int], set[int]] = defaultdict(set)
    touched: dict[str, int] = {}
    whole_groups: set[str] = set()  # grouped convs that lose whole groups
    per_group_norms: set[str] = set()
    for group, units in removals:
        if units.numel() == 0:
            continue
        for member in group.members:
            if member.role in ("grouped_in", "grouped_out", "depthwise"):
                whole_groups.add(member.module_name)
            elif member.role == "groupnorm" and member.repeats > 1:
                per_group_norms.add(member.module_name)  # each of its groups shrank alike
            idx = group.slice_indices(member, units.cpu()).tolist()
            touched.setdefault(member.module_name, 0)
            if member.role in ("norm", "layernorm", "groupnorm"):
                touched[member.module_name] += len(idx)
            for tensor_name, dim in member_slices(member):
                drop[(member.module_name, tensor_name, dim)].update(idx)
    for module_name in list(touched):
        parent = module_name.rpartition(".")[0] if module_name.endswith(".out_proj") else ""
        if parent and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            touched.setdefault(parent, 0)  # its output width changed
    for module_name in touched:
        module = model.get_submodule(module_name)
        if isinstance(module, nn.MultiheadAttention):
            decouple_heads_(module)  # inner width and embed_dim now differ
    per_tensor: dict[int, list] = {}
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for (module_name, tensor_name, dim), indices in drop.items():
        module = model.get_submodule(module_name)
        tensor = getattr(module, tensor_name, None)
        if tensor is None:
            continue
        per_tensor.setdefault(id(tensor), [tensor, []])[1].append((dim, indices))
    for module in model.modules():
        for name, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if id(t) in per_tensor:
                owners[id(t)].append((module, name))
    replaced: dict[torch.Tensor, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = {}
    for key, (tensor, cuts) in per_tensor.items():
        new, keeps = tensor.detach(), []
        for dim, indices in _merge_cuts(cuts).items():
            keep = torch.tensor(sorted(set(range(new.shape[dim])) - indices), dtype=torch.long)
            new = new.index_select(dim, keep.to(new.device))
            keeps.append((dim, keep))
        new = new.clone()
        shared = None
        for module, name in owners[key]:
            if is_unsaved_buffer(module, name):  # its kept indices are what gets saved
                record_buffer_slice_(model, _qualified(model, module, name), module, keeps)
            if shared is None:
                shared = _assign(module, name, tensor, new)
            elif isinstance(shared, nn.Parameter):
                setattr(module, name, shared)
            else:
                _assign(module, name, tensor, shared)
        replaced[tensor] = (shared, keeps)
    members = {id(model.get_submodule(name)) for name in touched}
    for owned in owners.values():  # a module that holds a sliced tensor without reading it
        for module, _ in owned:  # (a seq2seq model's ``shared`` embedding) follows its width
            if id(module) not in members:
                members.add(id(module))
                _fix_attributes(module)
    for module_name, dropped in touched.items():
        module = model.get_submodule(module_name)
        if module_name in whole_groups and _is_grouped(module):
            _fix_attributes(module, dropped, _whole_groups(module))
        elif module_name in per_group_norms:
            _fix_attributes(module, dropped, module.num_groups)
        else:
            _fix_attributes(module, dropped)
    if optimizer is not None:
        _slice_optimizer_state(optimizer, replaced)


def _qualified(model: nn.Module, module: nn.Module, name: str) -> str:
    where = next(n for n, m in model.named_modules(remove_duplicate=False) if m is module)
    return f"{where}.{name}" if where else name


def _merge_cuts(cuts: list[tuple[int, set[int]]]) -> dict[int, set[int]]:
    merged: dict[int, set[int]] = defaultdict(set)
    for dim, indices in cuts:
        merged[dim] |= indices
    return merged


def _slice_optimizer_state(
    optimizer: torch.optim.Optimizer,
    replaced: Mapping[torch.Tensor, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]],
) -> None:
    """Point ``optimizer`` at the new parameters and slice each state tensor shaped like them."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p not in replaced:
                continue
            new, keeps = replaced[p]
            state = optimizer.state.pop(p, None)
            group["params"][i] = new
            if state is None:
                continue
            sliced = dict(state)  # a new dict: the old one may be needed to undo the surgery
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    for dim, keep in keeps:
                        value = value.index_select(dim, keep.to(value.device))
                    sliced[key] = value.clone()
            optimizer.state[new] = sliced
