"""Sentence embeddings read from a model's output, as distillation and fidelity measures use them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._inputs import call_model
from .errors import ConfigError

EmbedFn = Callable[[nn.Module, Any], torch.Tensor]


def default_embed(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``(B, D)`` embedding of ``inputs``: the model's output tensor, or its
    ``last_hidden_state`` (or first item of a tuple output); a ``(B, T, D)`` sequence is
    mean-pooled over the tokens that ``inputs["attention_mask"]`` marks (all tokens without it).

    Raises:
        ConfigError: the output holds no tensor of 2 or 3 dims.
    """
    output = call_model(model, inputs)
    if isinstance(output, torch.Tensor):
        hidden = output
    elif getattr(output, "last_hidden_state", None) is not None:
        hidden = output.last_hidden_state
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
    else:
        raise ConfigError(
            f"cannot read an embedding from a {type(output).__name__} output: pass "
            "embed=lambda model, inputs: ... returning a (batch, dim) tensor"
        )
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() != 3:
        raise ConfigError(
            f"model output has shape {tuple(hidden.shape)}, not (batch, dim) or (batch, tokens, "
            "dim): pass embed=... returning a (batch, dim) tensor"
        )
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
