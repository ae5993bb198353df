"""Parameter counting: total, non-zero and per layer."""

from __future__ import annotations

from torch import nn

from .._experts import is_expert_stack
from ._metrics import LayerSparsity


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return ``(total, nonzero)`` over every parameter of ``model`` (shared ones counted once)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int((p.detach() != 0).sum())
    return total, nonzero


def layer_sparsity(model: nn.Module) -> tuple[LayerSparsity, ...]:
    """Per-module counts of each module's own ``weight`` parameter, in module order; a
    mixture-of-experts module's stacked expert weights get a row each, named by parameter."""
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() > 1:
            rows.append(LayerSparsity(name, weight.numel(), int((weight.detach() != 0).sum())))
        for attr, param in module.named_parameters(recurse=False):
            if is_expert_stack(module, param):
                label = f"{name}.{attr}" if name else attr
                rows.append(LayerSparsity(label, param.numel(), int((param.detach() != 0).sum())))
    return tuple(rows)
