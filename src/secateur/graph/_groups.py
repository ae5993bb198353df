"""Groups of coupled channels: the units structural pruning removes together."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ._spaces import Member, SpaceTable
from ._trace import OutputShapes, trace

# which tensors of a module a role slices, and along which dim
ROLE_SLICES: dict[str, tuple[tuple[str, int], ...]] = {
    "conv_out": (("weight", 0), ("bias", 0)),
    "conv_in": (("weight", 1),),
    "linear_out": (("weight", 0), ("bias", 0)),
    "linear_in": (("weight", 1),),
    "conv1d_out": (("weight", 1), ("bias", 0)),  # HF Conv1D keeps its weight as (in, out)
    "conv1d_in": (("weight", 0),),
    "convT_out": (("weight", 1), ("bias", 0)),
    "convT_in": (("weight", 0),),
    "grouped_out": (("weight", 0), ("bias", 0)),
    "grouped_in": (),  # whole groups go: a grouped conv's weight holds only its group's inputs
    "pergroup_in": (("weight", 1),),  # every group loses the same inputs: at the same places
    "pergroup_out": (("weight", 0), ("bias", 0)),
    "depthwise": (("weight", 0), ("bias", 0)),
    "norm": (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)),
    "layernorm": (("weight", 0), ("bias", 0)),
    "groupnorm": (("weight", 0), ("bias", 0)),
    "embedding": (("weight", 1),),
}
ORIGINS = {
    "conv_out",
    "linear_out",
    "conv1d_out",
    "convT_out",
    "grouped_out",
    "pergroup_out",
    "embedding",
    "param_out",
}
KINDS = ("channel", "head", "hidden")


def member_slices(member: Member) -> tuple[tuple[str, int], ...]:
    """``(tensor name, dim)`` pairs that ``member`` slices in its module."""
    if member.role in ("param", "param_out"):
        return ((member.tensor, member.dim),)
    return ROLE_SLICES[member.role]


@dataclass(frozen=True)
class Group:
    """``size`` channel units shared by ``members``; unit ``i`` of a member lives at features
    ``offset + i * factor + k`` (``k < factor``) of the member's sliced dims.

    ``kind`` is ``head`` for attention heads, ``hidden`` for channels whose statistics a norm or
    a reduction pools (a transformer's hidden size: removing them changes those statistics, so
    outputs move even for silent channels), and ``channel`` for neurons, filters and FFN width.
    """

    size: int
    members: tuple[Member, ...]
    kind: str = "channel"
    multiple: int = 1  # widths must stay multiples of this (from "multiple:N" space flags)
    shared_kv: bool = False  # query heads sharing one key/value head (multi-query attention)

    def feature_indices(self, member: Member, units: torch.Tensor) -> torch.Tensor:
        """Features of the tensor ``member`` reads or writes that the given ``units`` (a 1-D
        long tensor) cover, ``member.width`` per unit, unit by unit."""
        k = torch.arange(member.factor)
        idx = member.offset + units[:, None] * member.factor + k[None, :]
        if member.repeats > 1:
            copies = torch.arange(member.repeats) * member.period
            idx = idx[:, None, :] + copies[None, :, None]
        return idx.flatten()

    def slice_indices(self, member: Member, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``member``'s sliced dims (:func:`member_slices`) of ``units``: its
        features, except for a grouped conv's inputs, which its weight holds once per group
        (the features of the first group)."""
        if member.role == "pergroup_in":
            return self.feature_indices(replace(member, repeats=1), units)
        return self.feature_indices(member, units)

    @property
    def unit_width(self) -> int:
        """Channels one unit spans in the layers that write it (1 for neurons and filters, a
        head's size for heads, one per group for a grouped conv's shrinking groups)."""
        widths = [m.width for m in self.members if m.role in ORIGINS]
        return min(widths) if widths else 1

    def module_names(self) -> list[str]:
        return sorted({m.module_name for m in self.members})

    def producers(self) -> list[str]:
        """Names of the modules that write these channels (conv/linear outputs, embeddings,
        free parameters), sorted: the names per-layer settings match a group by."""
        return sorted({m.module_name for m in self.members if m.role in ORIGINS})


@dataclass(frozen=True)
class WidthAttribute:
    """A module attribute that equals a prunable width (GPT-2's ``split_size``, a head count
    used in a ``view``). Its new value is ``sum(width(term) * factor)`` over ``terms``, where a
    term is ``(group index or None, units, factor)`` and ``None`` means a fixed ``units``.
    ``names``: what the module's code running at the reshape referred to; only attributes among
    them are rewritten (all holding ``value`` when it is empty). ``spelled``: the identifiers in
    the reshape's own expression; when one of the candidates appears there, only those are
    rewritten (StableLM's ``num_heads`` in the ``view``, not its ``rotary_ndims`` of the same
    value, read later by a slice). ``spelled_at``: those of the shape entry at the width's own
    axis, when the source says; a candidate spelled only at another entry is not the width
    (timm Swin's ``view(-1, self.window_area, C)`` when the window area equals the width).
    ``passed``: the reshape ran in a function the module's code called; only candidates that
    code spelled in the call can have carried the width there. ``from_shape``: the entry at
    the width's axis is made of locals read from a tensor's shape (``B, N, C = x.shape``); it
    follows the pruned width by itself and no attribute is its source. ``sizes``: the split
    sizes, or the shape given whole to a reshape, the width was entry ``entry`` of; an
    attribute holding them all that the call names is rewritten whole."""

    module_name: str
    value: int
    terms: tuple[tuple[int | None, int, int], ...]
    names: frozenset[str] = frozenset()
    spelled: frozenset[str] = frozenset()
    spelled_at: frozenset[str] | None = None  # the identifiers at the width's own shape entry
    passed: bool = False  # the reshape ran in a function the module's code called
    from_shape: bool = False  # the entry at its axis is read from a tensor's shape
    sizes: tuple[int, ...] = ()  # a split's sizes or a whole shape; the width is ``entry``
    entry: int = -1

    def new_value(self, kept: Mapping[int, int]) -> int:
        return sum((kept.get(g, n) if g is not None else n) * f for g, n, f in self.terms)


@dataclass(frozen=True)
class DependencyGraph:
    """Prunable groups of a model, the reasons other channel spaces were left alone, and the
    module attributes that must follow the new widths."""

    groups: tuple[Group, ...]
    blocked: tuple[tuple[str, str], ...]  # (module names, reason)
    attributes: tuple[WidthAttribute, ...] = ()
    output_shapes: OutputShapes = ()  # of the traced forward pass; None: sized by the data


def build_dependency_graph(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its prunable channel groups.

    A group is every module slice that must lose the same channel indices together: the layers
    writing a space (conv/linear outputs, norms, depthwise convs, all residual operands) and the
    layers reading it, through flatten expansions, concat offsets, splits and attention heads.
    Spaces touched by an op without a channel rule, model inputs and outputs are reported in
    ``blocked`` instead. ``example_inputs`` is a tensor, a tuple of tensors or a dict of keyword
    tensors (e.g. ``{"input_ids": ids}`` for HF models).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [g.size for g in build_dependency_graph(net, torch.zeros(1, 4)).groups]
        [8]
    """
    tr = trace(model, example_inputs)
    table = tr.table
    _unite_tied(table, model)
    by_root: dict[int, list[Member]] = {}
    for idx in range(len(table.sizes)):
        for m in table.members[idx]:
            for root, offset, factor, repeats, period in table.resolve(idx, m.offset, m.factor):
                by_root.setdefault(root, []).append(
                    replace(m, offset=offset, factor=factor, repeats=repeats, period=period)
                )
    reasons: dict[int, str] = {}
    for root, members in by_root.items():
        if any(m.repeats == 0 for m in members):
            reasons[root] = "grouped convs nested in one another's groups"
    for idx, reason in table.blocked.items():
        for root, *_ in table.resolve(idx):
            reasons.setdefault(root, reason)
    for root, members in by_root.items():  # a tensor also read at fixed indices (a layer's
        for m in members:  # own weight through ``index_select``) keeps those entries
            if any((m.module_name, t, d) in tr.indexed for t, d in member_slices(m)):
                reasons.setdefault(root, f"{m.module_name} is read at fixed indices of them")
    flags: dict[int, set[str]] = {}
    for idx, names in table.flags.items():
        for root, *_ in table.resolve(idx):
            flags.setdefault(root, set()).update(names)
    groups, blocked, index = [], [], {}
    for root, members in by_root.items():
        reason = reasons.get(root)
        if reason is None and not any(m.role in ORIGINS for m in members):
            reason = "no layer produces these channels"
        names = ", ".join(sorted({m.module_name for m in members}))
        if reason is not None:
            blocked.append((names, reason))
            continue
        fl = flags.get(root, set())
        # pooled first: heads tied to a hidden width a norm pools are not removed exactly
        kind = "hidden" if "pooled" in fl else "head" if "heads" in fl else "channel"
        index[root] = len(groups)
        multiple = math.lcm(1, *(int(f.split(":")[1]) for f in fl if f.startswith("multiple:")))
        members = tuple(_unique(members))
        groups.append(Group(table.sizes[root], members, kind, multiple, "shared_kv" in fl))
    attributes = []
    for note in tr.notes:
        terms = []
        for seg in note.layout:
            for root, _, factor, repeats, _ in table.resolve(seg.space, 0, seg.factor):
                terms.append((index.get(root), table.sizes[root], factor * max(1, repeats)))
        attributes.append(
            WidthAttribute(
                note.module_name,
                note.value,
                tuple(terms),
                note.names,
                note.spelled,
                note.spelled_at,
                note.passed,
                note.from_shape,
                note.sizes,
                note.entry,
            )
        )
    return DependencyGraph(
        tuple(groups), tuple(blocked), tuple(dict.fromkeys(attributes)), tr.output_shapes
    )


def _unite_tied(table: SpaceTable, model: nn.Module) -> None:
    """Unite the spaces of members that slice one tensor (tied by identity, not by name: an
    encoder-decoder's embeddings and its LM head share one weight) the same way: surgery
    slices such a tensor once for all its owners, so they must lose the same channels."""
    first: dict[tuple[int, int, int, int, int, int], int] = {}
    for idx, members in enumerate(table.members):
        for m in members:
            module = model.get_submodule(m.module_name)
            for tensor_name, dim in member_slices(m):
                # the registered tensor itself: a parametrized weight is computed afresh
                # (a new tensor, whose id may be reused) and is nobody's to share
                tensor = module._parameters.get(tensor_name, module._buffers.get(tensor_name))
                if tensor is None:
                    continue
                key = (id(tensor), dim, m.offset, m.factor, m.repeats, m.period)
                if (other := first.setdefault(key, idx)) != idx:
                    table.unite(other, idx)


def _unique(members: list[Member]) -> list[Member]:
    return list(dict.fromkeys(members))
