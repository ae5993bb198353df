"""Registry of importance criteria: ``register_criterion``, ``list_criteria``, ``create_criterion``.

A registered factory returns either a :class:`Criterion` or a plain callable
``criterion(module, weight) -> scores`` returning a tensor of the weight's shape (higher means
more important; the lowest scores are pruned first). Plain callables need no calibration data
and work per weight and, added up over a channel unit's weights, per group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._criterion import Criterion, WeightContext

WeightCriterion = Callable[[nn.Module, torch.Tensor], torch.Tensor]

_CRITERIA: dict[str, Callable[..., Criterion | WeightCriterion]] = {}


def register_criterion(
    name: str,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a *factory* ``(**kwargs) -> Criterion | callable`` under ``name``.

    Example:
        >>> @register_criterion("doc-largest-first")
        ... def largest_first():
        ...     return lambda module, weight: weight.abs()
    """

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _CRITERIA:
            raise ValueError(f"criterion '{name}' is already registered")
        _CRITERIA[name] = factory
        return factory

    return decorate


def list_criteria() -> list[str]:
    """Names of all registered criteria, sorted."""
    return sorted(_CRITERIA)


def as_criterion(rule: Criterion | WeightCriterion) -> Criterion:
    """A :class:`Criterion` from either form a factory may return."""
    if isinstance(rule, Criterion):
        return rule
    if not callable(rule):
        raise ConfigError(f"a criterion must be callable, got {type(rule).__name__}")
    return Criterion(lambda ctx: _plain_scores(rule, ctx))


def _plain_scores(rule: WeightCriterion, ctx: WeightContext) -> torch.Tensor:
    scores = rule(ctx.module, ctx.weight)
    if not isinstance(scores, torch.Tensor) or scores.shape != ctx.weight.shape:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ConfigError(
            f"criterion returned {shape} for {ctx.name} of shape {tuple(ctx.weight.shape)}: "
            "return one score per weight"
        )
    return scores


def create_criterion(name: str, **kwargs: Any) -> Criterion:
    """Build the criterion registered as ``name``.

    Raises:
        ConfigError: for an unknown name or keyword.
    """
    if name not in _CRITERIA:
        raise ConfigError(f"unknown criterion '{name}': choose one of {', '.join(list_criteria())}")
    try:
        return as_criterion(_CRITERIA[name](**kwargs))
    except TypeError as exc:
        raise ConfigError(f"bad arguments for criterion '{name}': {exc}") from None
