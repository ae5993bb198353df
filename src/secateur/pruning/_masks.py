"""Binary masks over weights that stay enforced through training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class MaskSet:
    """Boolean keep-masks for named parameters of one model (``True`` = kept).

    The masked weights are zero from construction on. :meth:`hold` keeps them exactly zero
    across optimizer steps, momentum and weight decay included: gradients are masked before the
    step, optimizer state at pruned positions is zeroed, and the mask is re-applied after every
    step. :meth:`make_permanent` applies the masks a last time and forgets them.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.masks = {name: mask.to(torch.bool) for name, mask in masks.items()}
        for name, mask in self.masks.items():
            param = model.get_parameter(name)
            if param.shape != mask.shape:
                raise ValueError(
                    f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
                )
            self.masks[name] = mask.to(param.device)
        self.apply()

    def _params(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        for name, mask in self.masks.items():
            yield self.model.get_parameter(name), mask

    @torch.no_grad()
    def apply(self) -> None:
        """Set every masked-out weight to exactly 0."""
        for param, mask in self._params():
            param.masked_fill_(~mask, 0.0)

    @contextlib.contextmanager
    def hold(self, optimizer: torch.optim.Optimizer) -> Iterator[MaskSet]:
        """Keep masked weights at 0 for every ``optimizer.step()`` inside the block."""
        handles = []
        for param, mask in self._params():
            handles.append(param.register_hook(lambda grad, m=mask: grad.masked_fill(~m, 0.0)))
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.masked_fill_(~mask, 0.0)
        handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def make_permanent(self) -> None:
        """Apply the masks a final time and drop them; the zeros now live in the weights alone."""
        self.apply()
        self.masks = {}

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masked tensors, counted from the masks."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0
