"""The damped least-squares solve behind structured reconstruction (see :mod:`._reconstruct`).

Given a layer's full matrix ``W`` (``rows × cols``, a bias as its last column when it has one),
the second moment ``H = E[x xᵀ]`` of its input columns (a constant 1 for the bias) and the
columns to drop, the kept columns ``K`` become the solution of

    W' (H_KK + λI) = W H_:K + λ W_K,    λ = DAMPENING · mean(diag H_KK),

the least-squares fit of the old output ``W x`` from the kept inputs alone, damped towards the
old weights so that a matrix that loses nothing keeps its weights exactly. Dropped columns are
zero in the result.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

DAMPENING = 0.01  # of the mean diagonal of H, added to its diagonal before solving


def refit_kept_columns(
    full: torch.Tensor, gram: torch.Tensor, drop: torch.Tensor, what: str
) -> torch.Tensor:
    """``full`` (float64) with its kept columns refitted and its ``drop`` (a bool mask over the
    columns) zeroed; ``what`` names the matrix in the error raised for a non-finite ``gram``."""
    gram = gram.to(full.device, full.dtype)
    if not bool(torch.isfinite(gram).all()):
        raise ConfigError(
            f"reconstruction: the calibration inputs of {what} hold inf/NaN: check "
            "the calibration data, or prune without reconstruct"
        )
    keep = (~drop).nonzero().flatten().to(full.device)
    sub = gram[keep][:, keep]
    damp = DAMPENING * sub.diagonal().mean().clamp_min(1e-12)
    sub = sub + damp * torch.eye(len(keep), dtype=sub.dtype, device=sub.device)
    rhs = full @ gram[:, keep] + damp * full[:, keep]
    new = torch.zeros_like(full)
    new[:, keep] = torch.linalg.solve(sub, rhs.t()).t()  # sub is symmetric
    return new
