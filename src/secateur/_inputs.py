"""Example inputs, as every stage accepts them: a tensor, a sequence of positional tensors, or a
mapping of keyword tensors (HF style, e.g. ``{"input_ids": ids}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def split_inputs(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` to call a model with."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` applied to ``example_inputs`` in whichever form they come."""
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)
