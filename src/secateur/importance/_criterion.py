"""What a criterion is: a rule giving every weight a score (higher = more important), plus the
calibration statistics it needs and, optionally, a direct rule for whole channel units.

Per-weight scores serve unstructured pruning as they are; structural pruning adds them up over
every weight a channel unit's removal deletes (see :mod:`secateur.importance._scoring`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._experts import ExpertFeatures, is_expert_stack, per_expert_input, transposed
from ._statistics import NEEDS, FeatureStats, Statistics


@dataclass(frozen=True)
class WeightContext:
    """Everything a criterion may read about one weight tensor.

    ``name`` is the parameter's name in the model (the key of ``stats`` gradient tables),
    ``module_name`` the module holding it, ``weight`` the tensor itself.
    """

    name: str
    module_name: str
    module: nn.Module
    weight: torch.Tensor
    stats: Statistics

    def gradient_stat(self, table: str) -> torch.Tensor:
        """The ``taylor``/``fisher``/``hutchinson`` entry of this weight; zeros where no gradient
        reached it (an unused parameter cannot change the loss)."""
        value = getattr(self.stats, table).get(self.name)
        if value is None:
            return torch.zeros(self.weight.shape, device=self.weight.device)
        return value.to(self.weight.device)

    def input_features(self) -> FeatureStats | ExpertFeatures | None:
        """Statistics of the features this weight multiplies, when the module was seen running:
        per input feature, or per expert and input feature for a stacked expert weight."""
        experts = self.stats.experts.get(self.name)
        return experts if experts is not None else self.stats.inputs.get(self.module_name)

    def per_input(self, values: torch.Tensor) -> torch.Tensor | None:
        """``values`` (one per input feature of the module; ``(experts, in)`` for an expert
        stack) shaped to broadcast over the weight, or None when the weight is not a
        Linear/Conv/Conv1D kernel or expert stack with that many inputs."""
        return broadcast_inputs(self.module, self.weight, values.to(self.weight.device))


@dataclass(frozen=True)
class Criterion:
    """A ranking rule.

    Attributes:
        score: ``score(ctx) -> tensor of ctx.weight's shape``.
        needs: statistics to gather first, from :data:`secateur.importance._statistics.NEEDS`.
        reduce: how a channel unit adds up its weights' scores: ``sum``, or ``l2`` for the
            square root of the sum (scores that are squares, like ``l2``).
        unit_score: optional ``unit_score(features) -> (units,)`` for criteria defined on
            activations (mean activation, APoZ): given the :class:`FeatureStats` of a unit's
            features, already averaged per unit, it scores units directly.
    """

    score: Callable[[WeightContext], torch.Tensor]
    needs: tuple[str, ...] = ()
    reduce: str = "sum"
    unit_score: Callable[[FeatureStats], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise ValueError(f"unknown statistics {bad}: choose from {NEEDS}")
        if self.reduce not in ("sum", "l2"):
            raise ValueError(f"reduce={self.reduce!r}: choose sum or l2")


def broadcast_inputs(
    module: nn.Module, weight: torch.Tensor, values: torch.Tensor
) -> torch.Tensor | None:
    """Per-input-feature ``values`` laid out to broadcast against ``module``'s ``weight``."""
    if values.dim() == 2:
        return _per_expert(module, weight, values)
    n = values.numel()
    if type(module).__name__ == "Conv1D" and weight.dim() == 2 and weight.shape[0] == n:
        return values[:, None]  # HF Conv1D stores (in, out)
    if isinstance(module, nn.Linear) and weight.shape[-1] == n:
        return values[None, :]
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and weight.shape[0] == n:
        return values.view(n, *([1] * (weight.dim() - 1)))
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = module.groups
        per_group_in = weight.shape[1]
        if per_group_in * groups != n:
            return None
        per_group_out = weight.shape[0] // groups
        rows = values.view(groups, per_group_in).repeat_interleave(per_group_out, dim=0)
        return rows.view(*rows.shape, *([1] * (weight.dim() - 2)))
    return None


def _per_expert(
    module: nn.Module, weight: torch.Tensor, values: torch.Tensor
) -> torch.Tensor | None:
    if not is_expert_stack(module, weight) or values.shape[0] != weight.shape[0]:
        return None
    inputs = weight.shape[1] if transposed(module) else weight.shape[2]
    return per_expert_input(module, values) if values.shape[1] == inputs else None
