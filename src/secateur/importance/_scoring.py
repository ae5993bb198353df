"""Turn a criterion into scores: per weight for unstructured pruning, per channel unit of a
dependency-graph group for structural pruning, and normalised for ranking across layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..graph import Group, member_slices
from ._criterion import Criterion, WeightContext
from ._statistics import FeatureStats, LossFn, Statistics, collect_statistics

#: Member roles whose first sliced tensor holds weights a unit's removal deletes.
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
    "pergroup_out",
    "pergroup_in",
    "param_out",
}
#: Roles that read a space as their input features (where activation statistics are taken).
CONSUMER_ROLES = {"conv_in", "linear_in", "convT_in", "conv1d_in", "grouped_in", "pergroup_in"}
PRODUCER_ROLES = {
    *("conv_out", "linear_out", "convT_out", "conv1d_out", "grouped_out", "pergroup_out")
}
NORMALIZATIONS = ("none", "mean", "max", "sum", "l2")


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def gather(
    model: nn.Module,
    criterion: Criterion,
    params: Sequence[str],
    calibration: Any = None,
    loss_fn: LossFn | None = None,
) -> Statistics:
    """The statistics ``criterion`` needs, restricted to ``params`` for gradient tables."""
    if not criterion.needs:
        return Statistics()
    return collect_statistics(model, calibration, criterion.needs, params=params, loss_fn=loss_fn)


def weight_scores(
    model: nn.Module,
    criterion: Criterion,
    layers: dict[str, nn.Module],
    *,
    calibration: Any = None,
    loss_fn: LossFn | None = None,
    stats: Statistics | None = None,
) -> dict[str, torch.Tensor]:
    """``{parameter name: scores}`` of ``layers`` (as from ``prunable_weights``: keys are the
    parameter names, values the modules holding them), each of the weight's shape, float32, on
    the weight's device.

    Raises:
        ConfigError: the criterion needs calibration data and none was given, or it returned
            scores of the wrong shape.
    """
    ids = _param_names(model)
    weights = {key: model.get_parameter(key) for key in layers}
    names = [ids[id(w)] for w in weights.values()]
    stats = stats if stats is not None else gather(model, criterion, names, calibration, loss_fn)
    out = {}
    for (key, module), name in zip(layers.items(), names, strict=True):
        module_name = key.rsplit(".", 1)[0] if "." in key else ""
        ctx = WeightContext(name, module_name, module, weights[key], stats)
        out[key] = _checked(criterion.score(ctx), weights[key], key)
    return out


def _checked(scores: torch.Tensor, weight: torch.Tensor, key: str) -> torch.Tensor:
    if scores.shape != weight.shape:
        raise ConfigError(
            f"criterion returned shape {tuple(scores.shape)} for {key} of shape "
            f"{tuple(weight.shape)}: return one score per weight"
        )
    return scores.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def group_scores(
    model: nn.Module,
    groups: Sequence[Group],
    criterion: Criterion,
    *,
    calibration: Any = None,
    loss_fn: LossFn | None = None,
) -> list[torch.Tensor]:
    """One score per unit of each group, shape ``(group.size,)``, on the CPU.

    Weight criteria add up the scores of every weight the unit's removal deletes (its filters or
    rows in producers, its columns in consumers, all spatial copies after a flatten); ``l2``
    criteria take the square root of that sum. Activation criteria with a ``unit_score`` score
    the unit's features as its consumers read them (after any activation function), or as its
    producers write them when no consumer was seen; failing both they fall back to weights.
    """
    ids = _param_names(model)
    tensors: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for group in groups:
        for member in group.members:
            if member.role in WEIGHTED_ROLES:
                module = model.get_submodule(member.module_name)
                attr = member_slices(member)[0][0]
                tensor = getattr(module, attr)
                tensors.setdefault(
                    ids.get(id(tensor), f"{member.module_name}.{attr}"),
                    (module, member.module_name, tensor),
                )
    stats = gather(
        model, criterion, [n for n in tensors if n in _named(model)], calibration, loss_fn
    )
    maps: dict[int, torch.Tensor] = {}
    for name, (module, module_name, tensor) in tensors.items():
        ctx = WeightContext(name, module_name, module, tensor, stats)
        maps[id(tensor)] = _checked(criterion.score(ctx), tensor, name).cpu()
    return [_one_group(model, g, criterion, stats, maps) for g in groups]


def _named(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def _one_group(
    model: nn.Module,
    group: Group,
    criterion: Criterion,
    stats: Statistics,
    maps: dict[int, torch.Tensor],
) -> torch.Tensor:
    if criterion.unit_score is not None:
        features = _unit_features(group, stats)
        if features is not None:
            return criterion.unit_score(features).float().cpu()
    units = torch.arange(group.size)
    score = torch.zeros(group.size)
    for member in group.members:
        if member.role not in WEIGHTED_ROLES:
            continue
        module = model.get_submodule(member.module_name)
        attr, dim = member_slices(member)[0]
        element = maps[id(getattr(module, attr))]
        per_index = (
            element.sum(dim=[d for d in range(element.dim()) if d != dim])
            if element.dim() > 1
            else element
        )
        idx = group.slice_indices(member, units).view(group.size, -1)
        score += per_index[idx].sum(dim=1)
    return score.sqrt() if criterion.reduce == "l2" else score


def _unit_features(group: Group, stats: Statistics) -> FeatureStats | None:
    """Activation statistics per unit, averaged over the unit's features and over the modules
    that read (or, failing that, write) them."""
    for roles, table in ((CONSUMER_ROLES, stats.inputs), (PRODUCER_ROLES, stats.outputs)):
        found = []
        units = torch.arange(group.size)
        for member in group.members:
            entry = table.get(member.module_name)
            if member.role not in roles or entry is None:
                continue
            idx = group.feature_indices(member, units)
            if int(idx.max()) >= entry.sq_sum.numel():
                continue
            idx = idx.view(group.size, member.width)
            count = max(1, entry.count)
            found.append(
                [
                    (t.cpu()[idx].mean(dim=1) / count)
                    for t in (entry.sq_sum, entry.abs_sum, entry.zeros)
                ]
            )
        if found:
            sq, ab, zeros = (torch.stack(parts).mean(0) for parts in zip(*found, strict=True))
            return FeatureStats(sq, ab, zeros, 1)
    return None


def normalize(scores: torch.Tensor, method: str) -> torch.Tensor:
    """Divide one layer's (or group's) scores by their ``mean``/``max``/``sum``/``l2`` norm so
    that layers of different scale rank fairly together; ``none`` leaves them as they are."""
    if method not in NORMALIZATIONS:
        raise ConfigError(
            f"normalize={method!r} is not known: choose one of {', '.join(NORMALIZATIONS)}"
        )
    if method == "none":
        return scores
    s = scores.float()
    scale = {"mean": s.mean, "max": s.max, "sum": s.sum, "l2": s.norm}[method]()
    return s / scale if float(scale) > 0 else s
