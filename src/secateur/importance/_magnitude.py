"""Magnitude criteria: |w| (L1 per weight) and w² (L2 per weight)."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import WeightCriterion, register_criterion


@register_criterion("magnitude")
def magnitude() -> WeightCriterion:
    """Score each weight by its absolute value (Han et al. 2015)."""

    def score(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs()

    return score


@register_criterion("random")
def random(seed: int = 0) -> WeightCriterion:
    """Uniform random scores: the control every criterion should beat."""
    generator = torch.Generator().manual_seed(seed)

    def score(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return torch.rand(weight.shape, generator=generator).to(weight.device)

    return score
