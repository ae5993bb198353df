"""Structured pruning: remove whole channels/neurons found by the dependency graph."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from .._inputs import call_model
from ..errors import ConfigError, PruningError
from ..graph import KINDS, DependencyGraph, Group, build_dependency_graph
from ..graph._trace import OutputShapes, output_shapes, shapes_match
from ..importance import NORMALIZATIONS, create_criterion, group_scores, normalize
from ..importance._statistics import LossFn
from ._reconstruct import Refitter
from ._surgery import remove_units_
from ._unstructured import Scope, check_per_layer, match_per_layer
from ._width_attributes import update_width_attributes


@dataclass(frozen=True)
class StructuredConfig:
    """Remove ``ratio`` of the channel units of the prunable groups, ranked by ``criterion``.

    Attributes:
        ratio: fraction in [0, 1) of each group's units to remove (at least one unit is kept);
            with global scope, the fraction of all selected units.
        round_to: keep each group's width in channels a multiple of this (rounded down, never
            below it), so kernels stay efficient; a unit spanning several channels (a head, a
            channel in each group of a grouped conv) counts as all of them. 1 disables it.
        ignore: fnmatch patterns of module names; a group touching any of them is left whole.
        kinds: which granularities to prune: ``channel`` (neurons, conv filters, FFN width),
            ``head`` (whole attention heads; with grouped-query attention a unit is one key/value
            head and the query heads sharing it) and ``hidden`` (channels pooled by a
            LayerNorm/RMSNorm/GroupNorm or a reduction, such as a transformer's hidden size).
        criterion: a registered criterion; a unit scores the sum of its weights' scores (the
            square root for ``l2``), or its activations for ``activation``/``apoz``.
        scope: ``layer`` removes ``ratio`` of every group; ``global`` ranks the units of all
            groups together (after ``normalize``) and removes the lowest ``ratio`` of them, so
            robust groups give more; no group loses more than ``max_ratio``.
        normalize: per-group score normalisation for global ranking (``mean``, ``max``, ``sum``,
            ``l2`` or ``none``).
        max_ratio: with global scope, the largest fraction any one group may lose.
        per_layer: fnmatch pattern → ratio for the groups whose producing layers it matches
            (``Group.producers()``; the first matching pattern wins), pruned on their own.
        reconstruct: refit the layers that read removed units (Linear, HF Conv1D,
            ungrouped Conv1d/2d/3d, and stacked expert weights expert by expert) by least
            squares on the calibration inputs, so that their kept columns and bias reproduce
            their output in the unpruned model (see ``pruning._reconstruct``). Needs
            ``calibration``; costs one ``in_features²`` float64 matrix per refitted layer (per
            expert for a stack) and one calibration pass per 2 GiB of them.
    """

    ratio: float
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    kinds: tuple[str, ...] = KINDS
    criterion: str = "l2"
    scope: Scope = Scope.LAYER
    normalize: str = "mean"
    max_ratio: float = 0.9
    per_layer: dict[str, float] = field(default_factory=dict)
    reconstruct: bool = False

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
        object.__setattr__(self, "scope", coerce_enum("scope", Scope, self.scope))
        object.__setattr__(self, "per_layer", check_per_layer(self.per_layer))
        check_range("max_ratio", self.max_ratio, 0.0, 1.0, high_open=True)
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize={self.normalize!r} is not known: choose one of {', '.join(NORMALIZATIONS)}"
            )
        if not isinstance(self.reconstruct, bool):
            raise ConfigError(f"reconstruct={self.reconstruct!r} must be true or false")
        create_criterion(self.criterion)  # validates the name now, not mid-run

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
    refused: tuple[tuple[str, str], ...] = ()  # (module names, why): groups left whole because
    # removing their units broke the forward pass (a width computed from another tensor's size)

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
    calibration: Any = None,
    loss_fn: LossFn | None = None,
) -> StructuredResult:
    """Trace, score and physically remove the lowest-scoring units of the groups in place.

    Module attributes that the trace tied to a pruned width (head counts in a ``view``, split
    sizes) are updated and recorded in ``model.secateur_attributes`` so a saved model reloads.
    ``calibration`` and ``loss_fn`` feed data criteria (see ``unstructured_masks``), and
    ``calibration`` the refit of ``config.reconstruct``.
    """
    if example_inputs is None:
        raise ConfigError("structured pruning needs example_inputs: pass example_inputs=x")
    if config.reconstruct and calibration is None:
        raise ConfigError(
            "reconstruct=True refits layers on calibration inputs: pass calibration=batches"
        )
    graph = build_dependency_graph(model, example_inputs)
    chosen = [g for g in graph.groups if g.kind in config.kinds and not _ignored(g, config.ignore)]
    criterion = create_criterion(config.criterion)
    scores = group_scores(model, chosen, criterion, calibration=calibration, loss_fn=loss_fn)
    return remove_lowest_(
        model, graph, chosen, scores, config, example_inputs, optimizer, calibration=calibration
    )


def remove_lowest_(
    model: nn.Module,
    graph: DependencyGraph,
    groups: list[Group],
    scores: list[torch.Tensor],
    config: StructuredConfig,
    example_inputs: Any,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    calibration: Any = None,
) -> StructuredResult:
    """Remove the lowest-scoring units of ``groups`` (of ``graph``, traced on this model or on
    one it was deep-copied from) as ``config`` counts them, checking the forward pass; with
    ``config.reconstruct``, refit the layers reading them on ``calibration`` first.

    ``scores`` holds one score per unit of each group (as from ``group_scores``). Splitting the
    scoring from the removal lets a caller score once and cut many copies (sensitivity scans).
    """
    counts = _removal_counts(groups, scores, config)
    removals = []
    for group, score, count in zip(groups, scores, counts, strict=True):
        order = torch.sort(score, stable=True).indices
        removals.append((group, order[:count]))
    refit = None
    if config.reconstruct:
        if calibration is None:
            raise ConfigError(
                "reconstruct=True refits layers on calibration inputs: pass calibration=batches"
            )
        refit = Refitter(model, calibration)
    removals, refused = _apply_checked(model, graph, removals, example_inputs, optimizer, refit)
    widths = [(g.size, g.size - len(u)) for g, u in removals]
    return StructuredResult(graph, tuple(widths), tuple(refused))


def _removal_counts(
    groups: list[Group], scores: list[torch.Tensor], config: StructuredConfig
) -> list[int]:
    """How many units each group loses: its own ratio (per_layer or layer scope), or its share
    of the globally lowest normalised scores, then rounded to the group's width multiple."""
    ratios: list[float | None] = []
    for group in groups:
        own = match_per_layer(group.producers(), config.per_layer)
        ratios.append(config.ratio if own is None and config.scope is Scope.LAYER else own)
    pool = [i for i, r in enumerate(ratios) if r is None]
    if pool:
        entries = []
        for i in pool:
            s = normalize(scores[i], config.normalize)
            entries += [(float(v), i) for v in s]
        entries.sort(key=lambda e: e[0])
        budget = round(config.ratio * sum(groups[i].size for i in pool))
        taken = dict.fromkeys(pool, 0)
        cap = {i: int(config.max_ratio * groups[i].size) for i in pool}
        for _, i in entries:
            if budget <= 0:
                break
            if taken[i] < cap[i]:
                taken[i] += 1
                budget -= 1
        for i in pool:
            ratios[i] = taken[i] / groups[i].size
    counts = []
    for group, ratio in zip(groups, ratios, strict=True):
        per_unit = config.round_to // math.gcd(config.round_to, group.unit_width)
        multiple = math.lcm(per_unit, group.multiple)
        counts.append(group.size - units_to_keep(group.size, float(ratio), multiple))
    return counts


def _apply_checked(model, graph, removals, example_inputs, optimizer, refit=None):  # noqa: ANN001, ANN202
    """Apply ``removals`` (refitting first, when ``refit`` is given) and run the model; if it
    breaks, find the groups at fault one by one, leave them whole and apply the rest. Returns
    what was applied and what was refused."""
    snapshot = _Snapshot(model, optimizer)

    def restore() -> None:
        snapshot.restore()
        if refit is not None:
            refit.undo()

    def apply(batch, opt=None):  # noqa: ANN001, ANN202
        try:
            if refit is not None:
                refit(batch)
            apply_removals_(model, graph, batch, optimizer=opt)
        except Exception:
            restore()  # a failed refit or surgery leaves the model as it came
            raise

    apply(removals, optimizer)
    if _check_forward(model, example_inputs, graph.output_shapes) is None:
        return removals, []
    restore()
    kept, refused = [], []
    for kind in KINDS:  # whole kinds first: usually one kind (say, hidden size) is at fault
        batch = [(g, u) for g, u in removals if g.kind == kind]
        if not batch:
            continue
        apply(batch)
        problem = _check_forward(model, example_inputs, graph.output_shapes)
        restore()
        if problem is None:
            kept += batch
            continue
        for group, units in batch:
            apply([(group, units)])
            problem = _check_forward(model, example_inputs, graph.output_shapes)
            restore()
            if problem is None:
                kept.append((group, units))
            else:
                names = ", ".join(group.module_names())
                refused.append((names, f"pruning it broke the model: {problem}"))
    if not kept:
        return kept, refused
    apply(kept, optimizer)
    problem = _check_forward(model, example_inputs, graph.output_shapes)
    if problem is not None:
        restore()
        raise PruningError(
            f"pruning broke the forward pass ({problem}), so the model was restored: leave the "
            "layers at fault whole with StructuredConfig(ignore=[...]) or kinds=(...)"
        )
    return kept, refused


def _check_forward(model: nn.Module, example_inputs: Any, expected: OutputShapes) -> str | None:
    """None when the pruned model runs on ``example_inputs`` and keeps its output shapes
    (axes whose size follows the input's values, as a detector's number of boxes, aside)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    except Exception as exc:  # any failure means the surgery is not safe for this model
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.train(was_training)
    shapes = output_shapes(out)
    return None if shapes_match(shapes, expected) else f"output shapes {shapes} != {expected}"


class _Snapshot:
    """Cheap undo for surgery, which only ever replaces tensors and attributes: keep each
    module's attribute, parameter and buffer dicts (references, not copies of the data)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.modules = [
            (m, m.__class__, dict(vars(m)), dict(m._parameters), dict(m._buffers))
            for m in model.modules()
        ]
        self.optimizer = optimizer
        if optimizer is not None:
            self.state = dict(optimizer.state)
            self.params = [list(g["params"]) for g in optimizer.param_groups]

    def restore(self) -> None:
        for module, cls, attrs, params, buffers in self.modules:
            module.__class__ = cls  # surgery may have switched it (PrunedMultiheadAttention)
            module.__dict__.clear()
            module.__dict__.update(attrs)
            module._parameters = dict(params)  # copies: the snapshot may be restored again
            module._buffers = dict(buffers)
        if self.optimizer is not None:
            self.optimizer.state.clear()
            self.optimizer.state.update(self.state)
            for group, params in zip(self.optimizer.param_groups, self.params, strict=True):
                group["params"] = list(params)


def apply_removals_(
    model: nn.Module,
    graph: DependencyGraph,
    removals: list[tuple[Group, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Remove the given units of ``graph``'s groups and update the width attributes. Modules
    that cache tensors of their old widths and drop them on ``train()`` (timm's LeViT and
    TinyViT attention biases) see ``train()`` called, so the caches go; every module keeps
    its mode."""
    remove_units_(model, removals, optimizer=optimizer)
    index = {id(g): i for i, g in enumerate(graph.groups)}
    kept = {index[id(g)]: g.size - len(units) for g, units in removals}
    update_width_attributes(model, graph, kept)
    modes = {m: m.training for m in model.modules()}
    model.train(model.training)
    for module, mode in modes.items():
        module.training = mode
