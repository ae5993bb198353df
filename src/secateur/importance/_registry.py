"""Registry of weight-importance criteria: ``register_criterion``, ``list_criteria``, ``create_criterion``.

A criterion is a plain callable ``criterion(module, weight) -> scores`` returning a tensor of the
weight's shape; higher means more important, and the lowest scores are pruned first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

WeightCriterion = Callable[[nn.Module, torch.Tensor], torch.Tensor]

_CRITERIA: dict[str, Callable[..., WeightCriterion]] = {}


def register_criterion(
    name: str,
) -> Callable[[Callable[..., WeightCriterion]], Callable[..., WeightCriterion]]:
    """Decorator registering a *factory* ``(**kwargs) -> criterion`` under ``name``."""

    def decorate(factory: Callable[..., WeightCriterion]) -> Callable[..., WeightCriterion]:
        if name in _CRITERIA:
            raise ValueError(f"criterion '{name}' is already registered")
        _CRITERIA[name] = factory
        return factory

    return decorate


def list_criteria() -> list[str]:
    """Names of all registered criteria, sorted."""
    return sorted(_CRITERIA)


def create_criterion(name: str, **kwargs: Any) -> WeightCriterion:
    """Build the criterion registered as ``name``.

    Raises:
        ConfigError: for an unknown name or keyword.
    """
    if name not in _CRITERIA:
        raise ConfigError(f"unknown criterion '{name}': choose one of {', '.join(list_criteria())}")
    try:
        return _CRITERIA[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for criterion '{name}': {exc}") from None
