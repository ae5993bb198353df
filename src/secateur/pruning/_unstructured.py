"""Unstructured pruning: zero the individually least important weights to a target sparsity."""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._config import check_range, coerce_enum, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..importance import create_criterion
from ._masks import MaskSet

PRUNABLE_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class Scope(str, enum.Enum):
    """Where the threshold is drawn: one for all layers, or one per layer."""

    GLOBAL = "global"
    LAYER = "layer"


@dataclass(frozen=True)
class UnstructuredConfig:
    """Prune individual weights of Linear/Conv layers to ``sparsity``.

    Attributes:
        sparsity: fraction in [0, 1) of the selected weights to set to zero.
        scope: ``global`` ranks all selected weights together (layers end up with different
            sparsities); ``layer`` prunes each layer to ``sparsity`` on its own.
        criterion: a registered importance criterion name (see ``importance.list_criteria``).
        exclude: fnmatch patterns of module names to leave dense, e.g. ``("fc3",)``.
    """

    sparsity: float
    scope: Scope = Scope.GLOBAL
    criterion: str = "magnitude"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "scope", coerce_enum("scope", Scope, self.scope))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        create_criterion(self.criterion)  # validates the name now, not mid-run

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnstructuredConfig:
        return config_from_dict(cls, data)


def prunable_weights(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """``{"<module>.weight": module}`` for every Linear/Conv not matched by ``exclude``."""
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    }


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape with exactly its ``k`` lowest entries False."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        # stable sort breaks ties by position, so the count is exact and deterministic
        order = torch.sort(scores.flatten().float(), stable=True).indices
        keep[order[:k]] = False
    return keep.view_as(scores)


def unstructured_masks(model: nn.Module, config: UnstructuredConfig) -> dict[str, torch.Tensor]:
    """Compute keep-masks for ``config`` without touching the model."""
    layers = prunable_weights(model, config.exclude)
    if not layers:
        raise ConfigError("no Linear or Conv weights to prune: check the model and `exclude`")
    criterion = create_criterion(config.criterion)
    scores = {name: criterion(m, m.weight) for name, m in layers.items()}
    for name, s in scores.items():
        if s.shape != layers[name].weight.shape:
            raise ValueError(
                f"criterion '{config.criterion}' returned shape {tuple(s.shape)} for {name}"
            )
    if config.scope is Scope.LAYER:
        return {n: _lowest_k_mask(s, round(config.sparsity * s.numel())) for n, s in scores.items()}
    flat = torch.cat([s.flatten().float().cpu() for s in scores.values()])
    keep = _lowest_k_mask(flat, round(config.sparsity * flat.numel()))
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view_as(s).to(s.device)
        offset += s.numel()
    return masks


def prune_unstructured_(model: nn.Module, config: UnstructuredConfig) -> MaskSet:
    """Zero the weights chosen by ``config`` in place and return their masks."""
    return MaskSet(model, unstructured_masks(model, config))
