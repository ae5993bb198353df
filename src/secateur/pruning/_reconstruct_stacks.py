"""Structured reconstruction of stacked expert weights (see :mod:`secateur._experts`).

A mixture-of-experts layer keeps its experts' matrices in 3-D stacks, so removing FFN neurons
(or hidden channels) takes the same input columns from every expert's down projection (or
gate/up projection). Each expert is refitted on its own, as :mod:`._reconstruct` refits a
Linear: its ``H_e = E[x xᵀ]`` adds up the input rows the router sent to expert ``e`` (read by
:class:`~secateur._experts.ExpertGrams` off the ``F.linear``, ``grouped_mm`` or ``bmm`` calls
that multiply them), and the solve is :func:`._least_squares.refit_kept_columns`. A stack's
bias, when its module holds one as ``<stack>_bias`` with one row per expert (GPT-OSS), takes
each expert's folded mean like a Linear's bias.

An expert keeps plain removal (its removed columns zeroed) where it saw fewer than
:data:`ROWS_PER_COLUMN` times as many calibration rows as it keeps input columns: with fewer,
the fit follows the calibration rows rather than the layer (on a small Mixtral with 96 rows
for 64 kept columns per expert, the refit moved held-out logits more than plain removal), and
a warning says how many expert matrices that was. So does a stack whose products went
unseen (a kernel :class:`~secateur._experts.ExpertInputs` does not follow), with a warning naming it.

Memory: the statistics, ``experts × in²`` float64 per stack on the model's device, are
gathered in passes of at most ``max_bytes`` (a larger stack alone) and freed once the pass's
new weights are solved; those wait on the CPU until every pass is done, so that each pass sees
the unpruned model's inputs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._calibration import iter_calibration
from .._experts import ExpertGrams, expert_stacks, transposed
from .._inputs import call_model
from ..graph import Group
from ._least_squares import refit_kept_columns
from ._sparsegpt_solver import StopForward


def owner_name(stack: str) -> str:
    """The module name of the parameter named ``stack``."""
    return stack.rpartition(".")[0]


def _input_axis(module: nn.Module) -> int:
    return 1 if transposed(module) else 2


def removed_stack_columns(
    model: nn.Module, removals: Iterable[tuple[Group, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per expert stack (parameter name), the input features (sorted, unique) ``removals``
    delete along its experts' input axis."""
    stacks = expert_stacks(model)
    columns: dict[str, list[torch.Tensor]] = {}
    for group, units in removals:
        if len(units) == 0:
            continue
        for member in group.members:
            if member.role != "param":
                continue
            name = f"{member.module_name}.{member.tensor}" if member.module_name else member.tensor
            found = stacks.get(name)
            if found is not None and member.dim == _input_axis(found[1]):
                columns.setdefault(name, []).append(group.feature_indices(member, units.cpu()))
    return {name: torch.unique(torch.cat(parts)) for name, parts in columns.items()}


def stack_bias(model: nn.Module, stack: str) -> str | None:
    """The name of ``stack``'s bias: ``<stack>_bias`` of its module, one row per expert as wide
    as each expert's output; ``None`` when there is none."""
    name = f"{stack}_bias"
    try:
        bias = model.get_parameter(name)
    except AttributeError:
        return None
    param = model.get_parameter(stack)
    module = model.get_submodule(owner_name(stack))
    outputs = param.shape[2] if transposed(module) else param.shape[1]
    return name if tuple(bias.shape) == (param.shape[0], outputs) else None


def _gram_bytes(model: nn.Module, stack: str) -> int:
    param = model.get_parameter(stack)
    width = param.shape[_input_axis(model.get_submodule(owner_name(stack)))]
    width += stack_bias(model, stack) is not None
    return 8 * param.shape[0] * width * width


def _passes(model: nn.Module, stacks: list[str], max_bytes: int) -> list[list[str]]:
    passes: list[list[str]] = []
    held = max_bytes + 1
    for stack in stacks:
        size = _gram_bytes(model, stack)
        if held + size > max_bytes:
            passes.append([])
            held = 0
        passes[-1].append(stack)
        held += size
    return passes


#: an expert is refitted only with at least this many calibration rows per kept input column
ROWS_PER_COLUMN = 2


@dataclass(frozen=True)
class StackFit:
    """The refitted values of one stack (and of its bias), on the CPU, for the removal of
    ``columns`` from its experts' inputs."""

    columns: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def fit_stacks(
    model: nn.Module,
    stacks: dict[str, torch.Tensor],
    calls: dict[str, int],
    calibration: Any,
    max_bytes: int,
) -> dict[str, StackFit]:
    """Solve the refit of each stack of ``stacks`` (parameter name → input columns removed)
    whose module is in ``calls`` (module name → runs per batch, in execution order), on the
    unpruned model's calibration inputs, without changing the model. Stacks whose products
    went unseen are left out. Warns when experts kept plain removal for want of rows."""
    order = {module: i for i, module in enumerate(calls)}
    wanted = sorted(
        (s for s in stacks if owner_name(s) in order), key=lambda s: order[owner_name(s)]
    )
    biased = {s for s in wanted if stack_bias(model, s) is not None}
    device = next(model.parameters()).device
    fits: dict[str, StackFit] = {}
    short: list[int] = [0, 0]  # experts left plain for want of rows, experts solved
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for run in _passes(model, wanted, max_bytes):
                for name, (gram, rows) in _gather(
                    model, run, calls, calibration, biased, device
                ).items():
                    fits[name] = _solve(model, name, stacks[name], gram, rows, short)
                    del gram
    finally:
        model.train(was_training)
    if short[0]:
        warnings.warn(
            f"reconstruction kept plain removal for {short[0]} of {short[1]} expert matrices, "
            f"which saw fewer than {ROWS_PER_COLUMN} calibration rows per kept input: pass "
            "more calibration data to refit them",
            UserWarning,
            stacklevel=8,  # the prune_ call
        )
    unseen = [name for name in stacks if name not in fits]
    if unseen:
        warnings.warn(
            f"reconstruction saw no calibration rows reach {', '.join(unseen)} (a kernel it "
            "does not follow, or a module that did not run), so they keep plain removal",
            UserWarning,
            stacklevel=8,  # the prune_ call
        )
    return fits


def _gather(model, run, calls, calibration, biased, device):  # noqa: ANN001, ANN202
    """One pass over the calibration batches for the stacks of ``run``, each forward stopped
    once their modules have run as often as ``calls`` says: per stack ``(H, rows)``, ``H[e]``
    the mean ``x xᵀ`` over the ``rows[e]`` rows expert ``e`` multiplied (zero where none did)."""
    owners = {owner_name(s) for s in run}
    ran = dict.fromkeys(owners, 0)
    handles = []
    for owner in owners:

        def count(_mod: nn.Module, _args: Any, _out: Any, owner: str = owner) -> None:
            ran[owner] += 1
            if all(ran[o] >= calls[o] for o in owners):
                raise StopForward

        handles.append(model.get_submodule(owner).register_forward_hook(count))
    grams = ExpertGrams(model, run, torch.float64, biased & set(run))
    try:
        with grams:
            for inputs, _ in iter_calibration(calibration, device=device):
                ran.update(dict.fromkeys(owners, 0))
                with contextlib.suppress(StopForward):
                    call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for name in list(grams.sums):
        total, rows = grams.sums.pop(name), grams.rows[name]
        found[name] = (total.div_(rows.clamp_min(1).to(total)[:, None, None]), rows)
    return found


def _solve(
    model: nn.Module,
    stack: str,
    columns: torch.Tensor,
    gram: torch.Tensor,
    rows: torch.Tensor,
    short: list[int],
) -> StackFit:
    """The refitted stack and bias (CPU copies): each expert's kept columns solved on its
    ``gram``, its ``columns`` zeroed; an expert with too few ``rows`` only has them zeroed
    (counted in ``short[0]``, of ``short[1]`` experts)."""
    param = model.get_parameter(stack)
    bias_name = stack_bias(model, stack)
    bias = None if bias_name is None else model.get_parameter(bias_name)
    flip = transposed(model.get_submodule(owner_name(stack)))
    weight_out = param.detach().to("cpu", copy=True)
    bias_out = None if bias is None else bias.detach().to("cpu", copy=True)
    for expert in range(param.shape[0]):
        matrix = param[expert].t() if flip else param[expert]  # (out, in)
        full = matrix.detach().to(torch.float64, copy=True)
        if bias is not None:
            full = torch.cat([full, bias[expert].detach().double()[:, None]], dim=1)
        drop = torch.zeros(full.shape[1], dtype=torch.bool)
        drop[columns] = True
        short[1] += 1
        if int(rows[expert]) < ROWS_PER_COLUMN * int((~drop).sum()):
            short[0] += 1
            new = full.clone()
            new[:, drop.to(new.device)] = 0
        else:
            new = refit_kept_columns(full, gram[expert], drop, f"expert {expert} of {stack}")
        solved = new[:, : matrix.shape[1]].to("cpu", param.dtype)
        weight_out[expert] = solved.t() if flip else solved
        if bias_out is not None:
            bias_out[expert] = new[:, -1].to("cpu", bias_out.dtype)
    return StackFit(columns, weight_out, bias_out)
