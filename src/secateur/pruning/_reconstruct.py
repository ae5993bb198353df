"""Least-squares reconstruction of the layers that read removed channels.

Removing units of a channel group deletes input columns of the layers that read them (a
transformer's attention output projection loses a head's columns, an FFN's down projection a
neuron's). Left as they are, the kept columns no longer add up to the layer's old output. Given
calibration inputs ``x`` (with a constant 1 appended when the layer has a bias), the weights
over the kept columns ``K`` that best reproduce the old output ``W x + b`` in the least-squares
sense are

    W' = W H[:, K] H[K, K]^-1,   H = E[x xᵀ].

This folds the removed units' mean contribution into the bias and their correlated part into
the kept columns: the structured counterpart of SparseGPT's update, one solve per layer, all
layers' ``H`` from one calibration pass over the unpruned model (several when their matrices
would not fit in :data:`PASS_BYTES`). The layers refitted are those
:mod:`._layer_matrix` sees as one matrix product (Linear, ungrouped Conv1d/2d/3d, Hugging Face
Conv1D) and, expert by expert, the stacked expert weights of mixture-of-experts layers
(:mod:`._reconstruct_stacks`); any other reader of a removed unit is left as plain removal
leaves it.

Refitting the layers one after another on the inputs of the model pruned so far, against the
original's outputs (as SparseGPT's ``dense_targets`` does), was tried and left out: on
all-MiniLM-L6-v2 it reached a lower one-shot fidelity (0.8386 against 0.8448 at half the heads
and FFN neurons, 512 calibration sentences) in three times the time.

Reconstruction happens before the surgery, on the full-width weights (a removed column is
zeroed, which is what removing it does to the output), so that the surgery then slices the
updated tensors (and any optimizer state) exactly as it would the plain ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._calibration import iter_calibration
from .._inputs import call_model
from ..errors import ConfigError
from ..graph import Group
from ._layer_matrix import (
    column_index,
    input_rows,
    input_width,
    is_matrix_layer,
    to_weight_shape,
    weight_matrix,
)
from ._least_squares import refit_kept_columns
from ._reconstruct_stacks import StackFit, fit_stacks, owner_name, removed_stack_columns, stack_bias

# Consumer roles whose input columns can be refitted, and their modules.
_ROLES = ("linear_in", "conv1d_in", "conv_in")
#: The most bytes of ``H`` matrices one calibration pass gathers. A small model's layers all fit
#: in one pass; a large language model's do not (the FFN down projection of a 7B model alone
#: has an 11008² float64 ``H``, 0.97 GB), so its layers are gathered over several passes.
PASS_BYTES = 2 * 1024**3


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


class _Stop(Exception):
    """Ends a calibration forward pass once every hooked layer has seen its inputs."""


def execution_order(model: nn.Module, names: Iterable[str], batch: Any) -> dict[str, int]:
    """``names`` that run on ``batch``, in the order they first run, with how often each runs."""
    calls: dict[str, int] = {}
    handles = []
    for name in names:

        def count(_mod: nn.Module, _args: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1

        handles.append(model.get_submodule(name).register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _capture(model: nn.Module, calls: dict[str, int], inputs: Any) -> dict[str, list[torch.Tensor]]:
    """Each layer of ``calls``' input features on ``inputs`` (a 1 appended when it has a bias),
    the pass stopped as soon as all of them have run as often as ``calls`` says."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in calls}
    handles = []
    for name in calls:
        module = model.get_submodule(name)

        def record(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = input_rows(mod, args[0].detach(), torch.float64)
            if getattr(mod, "bias", None) is not None:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            seen[name].append(x)
            if all(len(seen[n]) >= calls[n] for n in calls):
                raise _Stop

        handles.append(module.register_forward_pre_hook(record))
    try:
        with contextlib.suppress(_Stop):
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _statistic_bytes(module: nn.Module) -> int:
    """Bytes of the float64 ``H`` of ``module`` (its bias adds a row and a column)."""
    width = input_width(module) + (getattr(module, "bias", None) is not None)
    return 8 * width * width


def _passes(model: nn.Module, calls: dict[str, int], max_bytes: int) -> list[dict[str, int]]:
    """``calls`` cut, in execution order, into runs whose matrices add up to at most
    ``max_bytes`` (a layer larger than that alone gets a pass to itself)."""
    passes: list[dict[str, int]] = []
    held = max_bytes + 1
    for name, count in calls.items():
        size = _statistic_bytes(model.get_submodule(name))
        if held + size > max_bytes:
            passes.append({})
            held = 0
        passes[-1][name] = count
        held += size
    return passes


def input_statistics(
    model: nn.Module, calls: dict[str, int], calibration: Any, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Per layer of ``calls`` (in execution order), ``H = E[x xᵀ]`` in float64 of its input
    features ``x`` (a 1 appended when it has a bias) over the calibration batches.

    One calibration pass gathers them all, unless their matrices add up to more than
    ``max_bytes`` (default :data:`PASS_BYTES`): then the layers are split, in execution order,
    into as many passes as keep each within it, each pass stopping after its last layer.
    """
    limit = PASS_BYTES if max_bytes is None else max_bytes
    sums: dict[str, torch.Tensor] = {}
    rows = dict.fromkeys(calls, 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for run in _passes(model, calls, limit):
                for inputs, _ in iter_calibration(calibration, device=device):
                    for name, features in _capture(model, run, inputs).items():
                        for x in features:
                            sums[name] = sums[name] + x.t() @ x if name in sums else x.t() @ x
                            rows[name] += x.shape[0]
    finally:
        model.train(was_training)
    if not sums:
        raise ConfigError(
            "reconstruction saw no calibration input: pass calibration batches that run the model"
        )
    return {name: total / rows[name] for name, total in sums.items()}


class Refitter:
    """Refits, in place and on full-width weights, every layer that removals take input columns
    from: the kept columns (and the bias) become the least-squares fit, on ``calibration``, of
    the layer's output in the unpruned model, and the removed columns are zeroed. Expert stacks
    are refitted expert by expert (:mod:`._reconstruct_stacks`). :meth:`undo` puts the weights
    it changed back, for a caller whose surgery was rolled back.

    The statistics are gathered at the first call, which must come before any surgery, and
    reused by later calls (on the same layers or fewer, after an undo); a stack's solved
    weights are reused for the same removed columns.

    The solve is damped towards the old weights (:mod:`._least_squares`), so that a layer that
    loses nothing keeps its weights exactly.
    """

    def __init__(self, model: nn.Module, calibration: Any) -> None:
        self.model = model
        self.calibration = calibration
        self.stats: dict[str, torch.Tensor] | None = None
        self.owner_calls: dict[str, int] = {}  # expert stacks' modules: runs per batch
        self.fits: dict[str, StackFit] = {}
        self.backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.stack_backup: dict[str, torch.Tensor] = {}  # parameter name -> values (CPU)

    def __call__(self, removals: list[tuple[Group, torch.Tensor]]) -> list[str]:
        """Refit the layers and expert stacks ``removals`` take columns from; return their
        names (a stack by its parameter's name)."""
        columns = {
            name: channels
            for name, channels in removed_columns(removals).items()
            if is_matrix_layer(self.model.get_submodule(name))
        }
        stacks = removed_stack_columns(self.model, removals)
        if not columns and not stacks:
            return []
        if self.stats is None:
            self._gather(columns, stacks)
        assert self.stats is not None
        stale = {
            name: cols
            for name, cols in stacks.items()
            if name not in self.fits or not torch.equal(self.fits[name].columns, cols)
        }
        if stale:  # solved before any layer below changes the inputs they see
            self.fits.update(
                fit_stacks(self.model, stale, self.owner_calls, self.calibration, PASS_BYTES)
            )
        done = [name for name in columns if name in self.stats]
        for name in done:
            self._refit(name, columns[name], self.stats[name])
        refitted = [name for name in stacks if name in self.fits]
        for name in refitted:
            self._write(name, self.fits[name])
        return done + refitted

    def _gather(self, columns: dict[str, torch.Tensor], stacks: dict[str, torch.Tensor]) -> None:
        device = next(self.model.parameters()).device
        batches = iter_calibration(self.calibration, device=device, max_batches=1)
        first = next(iter(batches), None)
        if first is None:
            raise ConfigError("calibration holds no batch: pass at least one batch of inputs")
        owners = {owner_name(name) for name in stacks}
        calls = execution_order(self.model, [*columns, *owners], first[0])
        layers = {name: count for name, count in calls.items() if name in columns}
        self.stats = input_statistics(self.model, layers, self.calibration) if layers else {}
        self.owner_calls = {name: count for name, count in calls.items() if name in owners}

    def _write(self, stack: str, fit: StackFit) -> None:
        """Put ``fit``'s values into the stack (and its bias), saving the old ones first."""
        bias = stack_bias(self.model, stack)
        with torch.no_grad():
            for name, values in ((stack, fit.weight), (bias, fit.bias)):
                if name is None or values is None:
                    continue
                param = self.model.get_parameter(name)
                if name not in self.stack_backup:
                    self.stack_backup[name] = param.detach().to("cpu", copy=True)
                param.copy_(values.to(param.device))

    def _refit(self, name: str, channels: torch.Tensor, gram: torch.Tensor) -> None:
        module = self.model.get_submodule(name)
        bias = getattr(module, "bias", None)
        if name not in self.backup:
            self.backup[name] = (
                module.weight.detach().clone(),
                None if bias is None else bias.detach().clone(),
            )
        full = weight_matrix(module, torch.float64)
        if bias is not None:
            full = torch.cat([full, bias.detach().double()[:, None]], dim=1)
        drop = torch.zeros(full.shape[1], dtype=torch.bool)
        drop[column_index(module, channels)] = True
        new = refit_kept_columns(full, gram, drop, f"layer {name}")
        with torch.no_grad():
            if bias is not None:
                bias.copy_(new[:, -1].to(bias.dtype))
                new = new[:, :-1]
            module.weight.copy_(to_weight_shape(module, new).to(module.weight.dtype))

    def undo(self) -> None:
        """Copy the saved weights back into the layers' and stacks' current (full-width)
        tensors."""
        with torch.no_grad():
            for name, (weight, bias) in self.backup.items():
                module = self.model.get_submodule(name)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
            for name, values in self.stack_backup.items():
                param = self.model.get_parameter(name)
                param.copy_(values.to(param.device))
        self.backup.clear()
        self.stack_backup.clear()
