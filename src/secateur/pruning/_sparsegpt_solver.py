"""The SparseGPT solver for one weight matrix (Frantar & Alistarh, 2023), shared by the layer
driver (:mod:`._sparsegpt`) and the expert-stack driver (:mod:`._sparsegpt_experts`): the
optimal-brain-surgeon walk over the columns with the lazy batch update, the dampened inverse
Cholesky factor it reads, and the dense-target retargeting of ``dense_targets``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class LayerTarget:
    """What one layer is pruned to: unstructured ``sparsity`` when ``m == 0``, else ``n:m``."""

    sparsity: float
    n: int = 0
    m: int = 0


class StopForward(Exception):
    """Raised in a forward pre-hook once the layers of the current step have seen their inputs."""


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor of ``scores``' shape, True at exactly its ``k`` lowest entries."""
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        out[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return out.view_as(scores)


def inverse_factor(h: torch.Tensor, w: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H⁻¹``; zeros ``w``'s columns of dead inputs."""
    fix = f"raise damp (e.g. damp=0.1) or check the calibration data of layer {name} for inf/NaN"
    if not bool(torch.isfinite(h).all()):
        raise ConfigError(f"layer {name}: its input Hessian holds inf/NaN: {fix}")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0:
            return upper
    raise ConfigError(f"layer {name}: its input Hessian is not positive definite: {fix}")


def retarget(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """``W + W·(C − H)·(H + λI)⁻¹``: the weights that best map the pruned model's inputs of a
    layer to the dense model's outputs of it, with a ridge term ``λ·‖Ŵ − W‖²`` (``λ`` as in
    :func:`inverse_factor`) so that directions the calibration inputs never span keep ``W``.
    Equal to ``W`` when the inputs did not drift (``C = H``)."""
    h = h.double()
    drift = w.double() @ (cross.double() - h)
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    # (W (C - H) H⁻¹)ᵀ = H⁻¹ ((C - H)ᵀ Wᵀ), H symmetric
    return (w.double() + torch.linalg.solve(h, drift.t()).t()).to(w.dtype)


def sparsegpt_matrix(
    w: torch.Tensor, h: torch.Tensor, target: LayerTarget, blocksize: int, damp: float, name: str
) -> torch.Tensor:
    """Prune ``w`` (float32 ``rows × cols``, edited in place) against ``H``; return the pruned
    positions (bool, ``rows × cols``)."""
    rows, cols = w.shape
    u = inverse_factor(h.clone(), w, damp, name)
    n, m = target.n, target.m
    if m:
        blocksize = max(m, blocksize - blocksize % m)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    done = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        if m:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # cumulative rounding: the per-block counts add up to exactly round(sparsity·numel)
            k = round(target.sparsity * rows * i2) - done
            k = min(max(k, 0), w1.numel())
            mask1 = _lowest(w1**2 / d**2, k)
            done += k
        for i in range(i2 - i1):
            if m and i % m == 0:
                saliency = w1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                lowest = torch.topk(saliency, m - n, dim=1, largest=False).indices
                mask1[:, i : i + m].scatter_(1, lowest, True)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            err = (col - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            q1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return pruned
