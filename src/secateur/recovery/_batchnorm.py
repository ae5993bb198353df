"""BatchNorm recalibration: the cheapest recovery after pruning.

Removing channels or blocks, or zeroing weights, shifts the distribution of every later
activation, but a BatchNorm layer in eval mode keeps normalising with the running mean and
variance of the unpruned model. On a BN network pruned one-shot that mismatch alone can take
accuracy to chance (ResNet-20 at 2x fewer MACs: about 10% on Fashion-MNIST, see
``benchmarks/RESULTS.md``). Re-estimating the statistics on a few batches, with no gradient
step, removes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._calibration import iter_calibration
from .._inputs import call_model
from ..errors import ConfigError, first_line

_NORM = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _NORM) and m.track_running_stats]


def recalibrate_batchnorm_(
    model: nn.Module, batches: Any, *, max_batches: int | None = None
) -> int:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` on
    ``batches`` (calibration-style batches: inputs, or ``(inputs, target)`` pairs), as their
    plain average over the batches; return how many layers were re-estimated.

    No parameter changes and no gradient is computed. Every other layer runs in eval mode
    (dropout off); each layer's mode and momentum are restored afterwards. A model without
    BatchNorm is left untouched (0 is returned). If the forward pass fails, the old statistics
    are put back.

    Raises:
        ConfigError: ``batches`` holds no batch, or a batch the model cannot run in train-mode
            BatchNorm (e.g. a single sample for a BatchNorm1d).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
        >>> recalibrate_batchnorm_(model, [torch.randn(8, 3)])
        1
    """
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in norms
    ]
    device = next(model.parameters()).device
    seen = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every batch counts the same
            m.train()
        with torch.no_grad():
            for inputs, _ in iter_calibration(batches, device=device, max_batches=max_batches):
                try:
                    call_model(model, inputs)
                except ValueError as exc:  # BatchNorm's own complaint about the batch shape
                    raise ConfigError(
                        f"BatchNorm recalibration cannot run this batch: {first_line(exc)}: pass "
                        "batches of more than one sample"
                    ) from None
                seen += 1
        if seen == 0:
            raise ConfigError("BatchNorm recalibration got no batch: pass at least one batch")
    except BaseException:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(norms)
