"""Embedding fidelity: how close a compressed encoder's sentence embeddings stay to the original's."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._calibration import iter_calibration
from .._embed import EmbedFn, default_embed
from ..errors import ConfigError
from ._onnx import OnnxRunner


def embed_batches(
    model: nn.Module | OnnxRunner, batches: Any, *, embed: EmbedFn | None = None
) -> torch.Tensor:
    """``(N, D)`` L2-normalised embeddings of every item of ``batches`` (calibration-style
    batches, moved to the model's device; to the CPU for an :class:`OnnxRunner`), computed in
    eval mode without gradients; the model's mode is restored. ``embed`` defaults to
    :func:`secateur.recovery.default_embed`."""
    embed = embed or default_embed
    if isinstance(model, OnnxRunner):
        device = torch.device("cpu")
    else:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [embed(model, inputs) for inputs, _ in iter_calibration(batches, device=device)]
    finally:
        model.train(was_training)
    return F.normalize(torch.cat(parts).float(), dim=-1)


def embedding_fidelity(
    model: nn.Module | OnnxRunner,
    reference: torch.Tensor,
    batches: Any,
    *,
    embed: EmbedFn | None = None,
) -> float:
    """Mean cosine similarity between ``model``'s embeddings of ``batches`` and ``reference``
    (the original model's, from :func:`embed_batches` on the same batches): 1.0 is identical.

    Raises:
        ConfigError: ``reference`` does not hold one embedding per item of ``batches``.
    """
    got = embed_batches(model, batches, embed=embed)
    if got.shape != reference.shape:
        raise ConfigError(
            f"reference embeddings {tuple(reference.shape)} do not match the {tuple(got.shape)} "
            "of these batches: compute both from the same batches"
        )
    return float((got * reference.to(got.device)).sum(-1).mean())
