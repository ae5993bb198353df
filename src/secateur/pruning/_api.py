"""``prune_``: the one in-place pruning verb, dispatched on the config's type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..importance._statistics import LossFn
from ._depth import DepthConfig, DepthResult, prune_depth_
from ._expert_removal import ExpertConfig, ExpertResult, prune_experts_
from ._masks import MaskSet
from ._sparsegpt import SparseGPTConfig, prune_sparsegpt_
from ._structured import StructuredConfig, StructuredResult, prune_structured_
from ._unstructured import UnstructuredConfig, prune_unstructured_


def prune_(
    model: nn.Module,
    config: Any,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | dict | None = None,
    calibration: Any = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> MaskSet | StructuredResult | DepthResult | ExpertResult:
    """Prune ``model`` in place as ``config`` says and return what was removed.

    ``UnstructuredConfig`` zeros weights and returns their :class:`MaskSet`;
    ``SparseGPTConfig`` zeros them layer by layer and updates the rest to reconstruct each
    layer's output on ``calibration`` (required), returning the :class:`MaskSet`;
    ``StructuredConfig`` traces the model on ``example_inputs`` (required), physically removes
    channels and returns a :class:`StructuredResult`; ``DepthConfig`` runs the model on
    ``example_inputs`` (required), replaces its least influential residual blocks by ``Skip``
    and returns a :class:`DepthResult`; ``ExpertConfig`` reads the routing on ``calibration``
    (required), removes the least-used experts of every mixture-of-experts layer and returns an
    :class:`ExpertResult`.

    ``calibration`` (batches of ``(inputs, targets)``, or a data split) feeds data criteria
    (``taylor``, ``obd``, ``activation``, ``apoz``, ``wanda``); ``loss_fn(outputs, targets)``
    replaces the default cross-entropy for gradient criteria.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = prune_(net, UnstructuredConfig(sparsity=0.5))
        >>> round(masks.sparsity(), 2)
        0.5

    Raises:
        ConfigError: for a config type this verb does not know.
    """
    if isinstance(config, UnstructuredConfig):
        return prune_unstructured_(model, config, calibration=calibration, loss_fn=loss_fn)
    if isinstance(config, StructuredConfig):
        return prune_structured_(
            model,
            config,
            example_inputs,
            optimizer=optimizer,
            calibration=calibration,
            loss_fn=loss_fn,
        )
    if isinstance(config, SparseGPTConfig):
        return prune_sparsegpt_(model, config, calibration)
    if isinstance(config, DepthConfig):
        return prune_depth_(model, config, example_inputs)
    if isinstance(config, ExpertConfig):
        return prune_experts_(model, config, calibration)
    raise ConfigError(
        f"prune_ does not know {type(config).__name__}: pass an UnstructuredConfig, "
        "SparseGPTConfig, StructuredConfig, DepthConfig or ExpertConfig"
    )
