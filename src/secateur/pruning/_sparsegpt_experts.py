"""SparseGPT on stacked mixture-of-experts weights (see :mod:`secateur._experts`).

Each expert's matrix is its own SparseGPT problem: its Hessian ``H_e = 2/n_e · Σ x xᵀ`` adds up
the ``n_e`` input rows the router sent to expert ``e``, read off the ``F.linear``,
``grouped_mm`` or ``bmm`` call that multiplied them (no module hook sees an expert run). A stack
is one step of the layer-by-layer driver, placed where the model first uses it, so the down
projection of an MoE layer is pruned against the inputs its pruned gate/up projection feeds it.
An expert no calibration row reached is pruned by magnitude (``H = I``), and named in a warning.

Memory: one stack's ``experts × in × in`` float32 Hessians at a time. ``dense_targets`` does not
apply to stacks: the dense model may route a token to other experts, so rows do not pair.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from .._calibration import iter_calibration
from .._experts import ExpertGrams, ExpertInputs, transposed
from .._inputs import call_model
from ._sparsegpt_solver import LayerTarget, StopForward, sparsegpt_matrix


class FirstUse(ExpertInputs):
    """Calls ``seen(name)`` the first time each stack multiplies rows (the execution order)."""

    def __init__(self, model: nn.Module, names: list[str], seen: Any) -> None:
        super().__init__(model, names)
        self.seen = seen
        self.done: set[str] = set()

    def take(self, name: str, experts: torch.Tensor, rows: torch.Tensor) -> None:
        if name not in self.done:
            self.done.add(name)
            self.seen(name)


def _owner_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def stack_width(model: nn.Module, name: str) -> int:
    """Input features of each expert matrix of stack ``name``."""
    param = model.get_parameter(name)
    return param.shape[1] if transposed(_owner_module(model, name)) else param.shape[2]


def prune_stack(
    model: nn.Module,
    name: str,
    target: LayerTarget,
    calls: int,
    calibration: Any,
    *,
    device: torch.device,
    max_batches: int | None,
    blocksize: int,
    damp: float,
) -> tuple[torch.Tensor, list[int]]:
    """Prune every expert of stack ``name`` in place against its own Hessian; return the
    keep-mask (the stack's shape) and the experts no calibration row reached.

    ``calls`` is how often the stack's module runs per batch: each forward pass stops after its
    last call.
    """
    module = _owner_module(model, name)
    hessians = ExpertGrams(model, [name])
    ran = [0]

    def stop(_module: nn.Module, _args: tuple, _out: Any) -> None:
        ran[0] += 1
        if ran[0] >= calls:
            raise StopForward

    handle = module.register_forward_hook(stop)
    try:
        with hessians:
            for inputs, _ in iter_calibration(calibration, device=device, max_batches=max_batches):
                ran[0] = 0
                with contextlib.suppress(StopForward):
                    call_model(model, inputs)
    finally:
        handle.remove()
    param = model.get_parameter(name)
    flip = transposed(module)
    keep = torch.ones_like(param, dtype=torch.bool)
    rows = hessians.rows.get(name, torch.zeros(param.shape[0], dtype=torch.long))
    unseen = []
    for expert in range(param.shape[0]):
        matrix = param[expert].t() if flip else param[expert]
        w = matrix.detach().float().clone()
        count = int(rows[expert])
        if count == 0:
            unseen.append(expert)
            h = torch.eye(w.shape[1], device=w.device)
        else:
            h = hessians.sums[name][expert].to(w.device) * (2.0 / count)
        pruned = sparsegpt_matrix(w, h, target, blocksize, damp, f"{name}[{expert}]")
        matrix.copy_(w.to(param.dtype))
        keep[expert] = ~(pruned.t() if flip else pruned)
    return keep, unseen


def warn_unseen(unseen: dict[str, list[int]]) -> None:
    """One warning naming the experts pruned by magnitude for want of calibration rows."""
    if unseen:
        listed = "; ".join(f"{name}: experts {experts}" for name, experts in unseen.items())
        warnings.warn(
            f"SparseGPT pruned by magnitude the experts no calibration token was routed to "
            f"({listed}): pass more calibration data to reach them",
            UserWarning,
            stacklevel=4,
        )
