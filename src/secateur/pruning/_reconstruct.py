"""Least-squares reconstruction of the layers that read removed channels.

Removing units of a channel group deletes input columns of the layers that read them (a
transformer's attention output projection loses a head's columns, an FFN's down projection a
neuron's). Left as they are, the kept columns no longer add up to the layer's old output. Given
calibration inputs ``x`` (with a constant 1 appended when the layer has a bias), the weights
over the kept columns that best reproduce the old output ``W x + b`` in the least-squares sense
are

    W' = W H[:, K] H[K, K]^-1,   H = E[x xᵀ],

where ``K`` are the kept columns (and the bias). This folds the removed units' mean
contribution into the bias and their correlated part into the kept columns: the structured
counterpart of SparseGPT's update, in one solve per layer.

Reconstruction happens before the surgery, on the full-width weights, so that the surgery then
slices the updated tensors (and any optimizer state) exactly as it would the plain ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._calibration import iter_calibration
from .._inputs import call_model
from ..errors import ConfigError
from ..graph import Group

# Consumer roles whose input columns can be refitted, and their modules.
_ROLES = ("linear_in", "conv1d_in", "conv_in")
DAMPENING = 0.01  # of the mean diagonal of H, added to its diagonal before solving


def removed_columns(removals: Iterable[tuple[Group, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per consumer module name, the input features (sorted, unique) that ``removals`` delete."""
    columns: dict[str, list[torch.Tensor]] = {}
    for group, units in removals:
        if len(units) == 0:
            continue
        for member in group.members:
            if member.role in _ROLES:
                columns.setdefault(member.module_name, []).append(
                    group.feature_indices(member, units.cpu())
                )
    return {name: torch.unique(torch.cat(parts)) for name, parts in columns.items()}


def _refittable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and isinstance(module.padding, tuple)
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(rows, in_features)`` of what ``module`` multiplies its weight by."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (N, C*kh*kw, L), channel-major as the weight is flattened
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``: a view for Linear and Conv2d, a transpose for HF Conv1D."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        return module.weight.detach().reshape(module.weight.shape[0], -1)
    return module.weight.detach().t()


def _feature_index(module: nn.Module, channels: torch.Tensor) -> torch.Tensor:
    """Weight columns of the given input channels (a conv channel spans kh*kw columns)."""
    if isinstance(module, nn.Conv2d):
        taps = module.kernel_size[0] * module.kernel_size[1]
        return (channels[:, None] * taps + torch.arange(taps)[None, :]).flatten()
    return channels


def gram_matrices(
    model: nn.Module,
    names: Iterable[str],
    calibration: Any,
    *,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per module in ``names`` (refittable ones only), ``E[x̃ x̃ᵀ]`` in float64 over the
    calibration inputs it sees, ``x̃`` its input features with a 1 appended when it has a bias."""
    modules = {n: model.get_submodule(n) for n in names}
    modules = {n: m for n, m in modules.items() if _refittable(m)}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(modules, 0)

    def hook(name: str, module: nn.Module):  # noqa: ANN202
        def record(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = _features(module, args[0].detach()).double()
            if getattr(module, "bias", None) is not None:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            total = x.t() @ x
            sums[name] = sums[name] + total if name in sums else total
            rows[name] += x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in modules.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, _ in iter_calibration(calibration, device=device, max_batches=max_batches):
                call_model(model, inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if modules and not sums:
        raise ConfigError(
            "reconstruction saw no calibration input: pass calibration batches that run the model"
        )
    return {n: sums[n] / rows[n] for n in sums}


class Refitter:
    """Refits, in place and on full-width weights, every layer that removals take input columns
    from and that ``grams`` (from :func:`gram_matrices`, on the unpruned model) covers: the kept
    columns (and the bias) become the least-squares fit of the layer's old output, the removed
    columns are zeroed. :meth:`undo` puts the weights it changed back, for a caller whose
    surgery was rolled back.

    The solve is damped towards the old weights, ``W' (H_KK + λI) = W H_:K + λ W_K`` with
    ``λ`` = ``DAMPENING`` × the mean of ``diag(H_KK)``, so that a layer that loses nothing keeps
    its weights exactly.
    """

    def __init__(self, model: nn.Module, grams: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.grams = grams
        self.backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, removals: list[tuple[Group, torch.Tensor]]) -> list[str]:
        """Refit the layers ``removals`` take columns from; return their names."""
        done = []
        for name, channels in removed_columns(removals).items():
            if name in self.grams:
                self._refit(name, channels)
                done.append(name)
        return done

    def _refit(self, name: str, channels: torch.Tensor) -> None:
        module = self.model.get_submodule(name)
        bias = getattr(module, "bias", None)
        if name not in self.backup:
            self.backup[name] = (
                module.weight.detach().clone(),
                None if bias is None else bias.detach().clone(),
            )
        full = _matrix(module).double()
        if bias is not None:
            full = torch.cat([full, bias.detach().double()[:, None]], dim=1)
        drop = torch.zeros(full.shape[1], dtype=torch.bool)
        drop[_feature_index(module, channels)] = True
        keep = (~drop).nonzero().flatten().to(full.device)
        gram = self.grams[name].to(full.device)
        sub = gram[keep][:, keep]
        damp = DAMPENING * sub.diagonal().mean().clamp_min(1e-12)
        sub = sub + damp * torch.eye(len(keep), dtype=sub.dtype, device=sub.device)
        rhs = full @ gram[:, keep] + damp * full[:, keep]
        new = torch.zeros_like(full)
        new[:, keep] = torch.linalg.solve(sub, rhs.t()).t()  # sub is symmetric
        with torch.no_grad():
            if bias is not None:
                bias.copy_(new[:, -1].to(bias.dtype))
                new = new[:, :-1]
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.weight.copy_(new.reshape(module.weight.shape).to(module.weight.dtype))
            else:
                module.weight.copy_(new.t().to(module.weight.dtype))

    def undo(self) -> None:
        """Copy the saved weights back into the layers' current (full-width) tensors."""
        with torch.no_grad():
            for name, (weight, bias) in self.backup.items():
                module = self.model.get_submodule(name)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
        self.backup.clear()
