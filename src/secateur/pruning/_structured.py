"""Structured pruning: remove whole channels/neurons found by the dependency graph."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._config import check_int, check_range, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..graph import KINDS, DependencyGraph, Group, build_dependency_graph
from ..importance import group_l2
from ._surgery import remove_units_


@dataclass(frozen=True)
class StructuredConfig:
    """Remove ``ratio`` of the channel units of every prunable group, by group L2 magnitude.

    Attributes:
        ratio: fraction in [0, 1) of each group's units to remove (at least one unit is kept).
        round_to: keep each group's width a multiple of this (rounded down, never below it),
            so kernels stay efficient; 1 disables rounding.
        ignore: fnmatch patterns of module names; a group touching any of them is left whole.
        kinds: which granularities to prune: ``channel`` (neurons, conv filters, FFN width),
            ``head`` (whole attention heads; with grouped-query attention a unit is one key/value
            head and the query heads sharing it) and ``hidden`` (channels pooled by a
            LayerNorm/RMSNorm/GroupNorm or a reduction, such as a transformer's hidden size).
    """

    ratio: float
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        check_int("round_to", self.round_to, 1)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ConfigError(
                f"kinds={list(kinds)} is not valid: choose one or more of {', '.join(KINDS)}"
            )
        object.__setattr__(self, "kinds", kinds)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class StructuredResult:
    """What ``prune_`` removed: per group, its width before and after."""

    graph: DependencyGraph
    widths: tuple[tuple[int, int], ...]

    @property
    def removed_units(self) -> int:
        return sum(before - after for before, after in self.widths)


def units_to_keep(size: int, ratio: float, round_to: int) -> int:
    """Width left after removing ``ratio`` of ``size`` units, rounded down to ``round_to``.

    A group that would lose nothing stays whole, whatever its width.
    """
    keep = max(1, size - int(round(ratio * size)))
    if keep == size:
        return size
    if round_to > 1 and size >= round_to:
        keep = max(round_to, keep // round_to * round_to)
    return min(size, keep)


def _ignored(group: Group, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in group.module_names() for p in patterns)


def prune_structured_(
    model: nn.Module,
    config: StructuredConfig,
    example_inputs: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> StructuredResult:
    """Trace, score and physically remove the lowest-scoring units of every group in place.

    Module attributes that the trace tied to a pruned width (head counts in a ``view``, split
    sizes) are updated and recorded in ``model.secateur_attributes`` so a saved model reloads.
    """
    if example_inputs is None:
        raise ConfigError("structured pruning needs example_inputs: pass example_inputs=x")
    graph = build_dependency_graph(model, example_inputs)
    removals, widths, kept = [], [], {}
    for index, group in enumerate(graph.groups):
        if group.kind not in config.kinds or _ignored(group, config.ignore):
            continue
        keep = units_to_keep(group.size, config.ratio, config.round_to)
        scores = group_l2(model, group)
        order = torch.sort(scores, stable=True).indices
        removals.append((group, order[: group.size - keep]))
        widths.append((group.size, keep))
        kept[index] = keep
    remove_units_(model, removals, optimizer=optimizer)
    _update_attributes(model, graph, kept)
    return StructuredResult(graph, tuple(widths))


def _update_attributes(model: nn.Module, graph: DependencyGraph, kept: dict[int, int]) -> None:
    edits: dict[str, dict[str, int]] = getattr(model, "secateur_attributes", {})
    for attr in graph.attributes:
        new = attr.new_value(kept)
        if new == attr.value:
            continue
        module = model.get_submodule(attr.module_name)
        for name, value in vars(module).items():
            if name.startswith("_") or isinstance(value, bool) or value != attr.value:
                continue
            if "head_dim" in name or "head_size" in name:
                continue  # within-head sizes never change: whole heads go
            setattr(module, name, new)
            edits.setdefault(attr.module_name, {})[name] = new
    if edits:
        model.secateur_attributes = edits
