"""The built-in criteria, registered by name.

Weight scores (higher = keep):

- ``magnitude`` / ``l1``: ``|w|`` (Han et al. 2015); ``l2``: ``w²``, a unit adds them up as an L2 norm.
- ``taylor``: ``Σ_batches |w · ∂L/∂w|``, first-order Taylor sensitivity (Molchanov et al. 2017, 2019).
- ``obd``: ``½ · h · w²`` with ``h`` the Hessian diagonal from the empirical Fisher or Hutchinson's
  estimator (LeCun et al. 1990, "Optimal Brain Damage").
- ``activation``: ``|w| · E|x|`` of the input the weight multiplies; a unit's score is its mean
  absolute activation (Molchanov et al. 2017).
- ``apoz``: ``|w| · (1 − APoZ(x))``; a unit's score is ``1 − APoZ``, the fraction of positions
  where it is not zero (Hu et al. 2016).
- ``wanda``: ``|w| · ‖x‖₂`` over the input feature's calibration positions (Sun et al. 2023).
- ``random``: uniform scores, the control every criterion should beat.

Where a data criterion has no statistics for a tensor (an embedding table, a position embedding,
a module the calibration never ran), it falls back to ``|w|``, so ranking stays defined.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._criterion import Criterion, WeightContext
from ._registry import register_criterion


def _abs(ctx: WeightContext) -> torch.Tensor:
    return ctx.weight.detach().abs().float()


def _times_input(ctx: WeightContext, pick: str) -> torch.Tensor:
    features = ctx.input_features()
    if features is None:
        return _abs(ctx)
    per_feature = {"norm": features.norm, "mean_abs": features.mean_abs}.get(pick)
    values = per_feature() if per_feature else 1.0 - features.apoz()
    laid = ctx.per_input(values)
    return _abs(ctx) if laid is None else _abs(ctx) * laid


@register_criterion("magnitude")
def magnitude() -> Criterion:
    """``|w|``: the smallest weights go first (Han et al. 2015)."""
    return Criterion(_abs)


@register_criterion("l1")
def l1() -> Criterion:
    """``|w|``; a channel unit's score is the L1 norm of its weights."""
    return Criterion(_abs)


@register_criterion("l2")
def l2() -> Criterion:
    """``w²``; a channel unit's score is the L2 norm of its weights."""
    return Criterion(lambda ctx: ctx.weight.detach().float().pow(2), reduce="l2")


@register_criterion("random")
def random(seed: int = 0) -> Criterion:
    """Uniform random scores (seeded): the control."""
    generator = torch.Generator().manual_seed(seed)
    return Criterion(
        lambda ctx: torch.rand(ctx.weight.shape, generator=generator).to(ctx.weight.device)
    )


@register_criterion("taylor")
def taylor() -> Criterion:
    """``Σ_batches |w · ∂L/∂w|``: the first-order estimate of the loss change if ``w`` goes."""
    return Criterion(lambda ctx: ctx.gradient_stat("taylor"), needs=("taylor",))


@register_criterion("obd")
def obd(hessian: str = "fisher") -> Criterion:
    """Optimal Brain Damage saliency ``½ · h · w²``.

    ``hessian="fisher"`` takes ``h`` from the empirical Fisher diagonal (per-sample squared
    gradients); ``"hutchinson"`` estimates the true Hessian diagonal with Rademacher probes.
    """
    if hessian not in ("fisher", "hutchinson"):
        raise ConfigError(f"obd hessian={hessian!r} is not known: choose fisher or hutchinson")

    def score(ctx: WeightContext) -> torch.Tensor:
        return 0.5 * ctx.gradient_stat(hessian) * ctx.weight.detach().float().pow(2)

    return Criterion(score, needs=(hessian,))


@register_criterion("activation")
def activation() -> Criterion:
    """Mean absolute activation: of a unit's channel, or of the input a weight multiplies."""
    return Criterion(
        lambda ctx: _times_input(ctx, "mean_abs"),
        needs=("activations",),
        unit_score=lambda features: features.mean_abs(),
    )


@register_criterion("apoz")
def apoz() -> Criterion:
    """``1 − APoZ``: channels that are zero at most positions go first."""
    return Criterion(
        lambda ctx: _times_input(ctx, "apoz"),
        needs=("activations",),
        unit_score=lambda features: 1.0 - features.apoz(),
    )


@register_criterion("wanda")
def wanda() -> Criterion:
    """``|w| · ‖x‖₂``: weight magnitude times its input feature's norm (Sun et al. 2023)."""
    return Criterion(lambda ctx: _times_input(ctx, "norm"), needs=("activations",))


@register_criterion("obd_hutchinson")
def obd_hutchinson() -> Criterion:
    """``obd`` with the Hessian diagonal from Hutchinson's estimator (double backprop)."""
    return obd(hessian="hutchinson")
