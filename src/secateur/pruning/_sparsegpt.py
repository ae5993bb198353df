"""SparseGPT: one-shot pruning that repairs each layer as it prunes (Frantar & Alistarh, 2023).

For a layer with weight ``W`` (``rows × cols``, columns = input features) and calibration inputs
``X`` (``cols × samples``), SparseGPT minimises ``‖WX − ŴX‖²`` over sparse ``Ŵ``. With
``H = 2·X·Xᵀ`` it walks the columns left to right; for each column it zeros the pruned weights
and spreads their error over the columns not yet visited by the optimal-brain-surgeon update,
read off one row of the upper Cholesky factor of ``H⁻¹``. Columns go in blocks of
``blocksize``: the mask is chosen inside the block just before the block is processed (so it
sees the updates of earlier blocks), and the accumulated error reaches the later columns in one
matmul after the block (the lazy batch update).

Layers handled: those :mod:`._layer_matrix` sees as one matrix product (``nn.Linear``;
``nn.Conv1d``/``Conv2d``/``Conv3d`` with ``groups == 1``, their input unfolded with the conv's
own kernel, stride, padding and dilation; Hugging Face ``Conv1D``), and the stacked expert
weights of mixture-of-experts layers, one SparseGPT problem per expert on the rows routed to it
(:mod:`._sparsegpt_experts`). Grouped and depthwise convs, transposed convs and every other
module are left dense. Layers that never run on the
calibration inputs are left dense too, with a warning. A weight shared with another module
(a language model's head tied to its embedding) is pruned for both: exclude such a layer.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._calibration import iter_calibration
from .._config import check_int, check_range, config_from_dict, config_to_dict
from .._experts import expert_stacks
from .._inputs import call_model
from .._progress import make_progress
from ..errors import ConfigError
from ._layer_matrix import (
    CONVS,
    conv_padding,
    input_rows,
    input_width,
    is_matrix_layer,
    to_weight_shape,
    weight_matrix,
)
from ._masks import MaskSet
from ._sparsegpt_experts import FirstUse, prune_stack, stack_width, warn_unseen
from ._sparsegpt_solver import LayerTarget, StopForward, retarget, sparsegpt_matrix

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _parse_nm(nm: Any) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; anything but ``"N:M"`` with ``0 < N < M`` raises ConfigError."""
    match = _NM_RE.match(nm) if isinstance(nm, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(
            f"nm={nm!r} is not an N:M pattern: pass a string 'N:M' with 0 < N < M, e.g. '2:4'"
        )
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class SparseGPTConfig:
    """How :func:`prune_sparsegpt_` prunes.

    Attributes:
        sparsity: fraction in [0, 1) of each layer's weights to zero (unstructured).
        nm: ``"N:M"`` (``0 < N < M``, e.g. ``"2:4"``): in every row, each run of ``M``
            consecutive input columns (aligned at multiples of ``M``) keeps ``N`` weights, as
            sparse tensor cores and ``UnstructuredConfig(nm=...)`` count it.
            When set it replaces ``sparsity``; every pruned layer's input width must then be a
            multiple of ``M`` (the block size is rounded down to a multiple of ``M``, at least
            ``M``, so that no run straddles two blocks).
        blocksize: columns per block of the lazy batch update.
        damp: added to the diagonal of ``H`` as ``damp × mean(diag H)``; > 0.
        exclude: fnmatch patterns of module names to leave dense (not in the returned masks).
        per_layer: fnmatch pattern → unstructured sparsity in [0, 1) for the layers it matches;
            the first matching pattern wins and overrides ``sparsity`` and ``nm`` there. A layer
            at 0 is left as it is (its mask keeps everything).
        max_batches: read at most this many calibration batches per layer (``None``: all).
        dense_targets: reconstruct each layer's output in the *dense* model (on the dense
            model's inputs) instead of its own output on the pruned model's inputs, so that
            later layers also correct the error earlier ones left (asymmetric calibration, as
            in GPTAQ). The weights are first moved to the least-squares optimum for that, kept
            near ``W`` by a ridge term: ``W + W·(C − H)·(H + λI)⁻¹`` with
            ``C = 2/n·X_denseᵀ·X_pruned``; then they are pruned against ``H`` as usual.
            Costs a dense copy of the model and a second, equally short forward per batch.
    """

    sparsity: float = 0.5
    nm: str | None = None
    blocksize: int = 128
    damp: float = 0.01
    exclude: tuple[str, ...] = ()
    per_layer: dict[str, float] = field(default_factory=dict)
    max_batches: int | None = None
    dense_targets: bool = False

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.nm is not None:
            _parse_nm(self.nm)
        check_int("blocksize", self.blocksize, 1)
        check_range("damp", self.damp, 0.0, low_open=True)
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(
                f"exclude={self.exclude!r} must be a sequence of fnmatch patterns, e.g. ('fc3',)"
            )
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.per_layer, Mapping):
            raise ConfigError(
                f"per_layer={self.per_layer!r} must map fnmatch patterns to sparsities, e.g. {{'fc3': 0.3}}"
            )
        for pattern, value in self.per_layer.items():
            if not isinstance(pattern, str):
                raise ConfigError(f"per_layer key {pattern!r} must be a string fnmatch pattern")
            check_range(f"per_layer[{pattern!r}]", value, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "per_layer", dict(self.per_layer))
        if self.max_batches is not None:
            check_int("max_batches", self.max_batches, 1)
        if not isinstance(self.dense_targets, bool):
            raise ConfigError(f"dense_targets={self.dense_targets!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` reads it back to an equal config."""
        out = config_to_dict(self)
        out["per_layer"] = dict(self.per_layer)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseGPTConfig:
        """Build a config from :meth:`to_dict`'s form; unknown keys raise ConfigError."""
        return config_from_dict(cls, data)


# --- layers ----------------------------------------------------------------------------------


def _prunable(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """``{module name: module}`` of every layer SparseGPT handles, ``exclude`` left out."""
    out = {}
    for name, module in model.named_modules():
        if is_matrix_layer(module) and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            out[name] = module
    return out


def _stacks(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, str]:
    """``{parameter name: module name}`` of every stacked expert weight not excluded (patterns
    match the module or the parameter name)."""
    return {
        name: module_name
        for name, (module_name, _) in expert_stacks(model).items()
        if not any(fnmatch.fnmatchcase(n, p) for n in (name, module_name) for p in exclude)
    }


def _target(name: str, config: SparseGPTConfig, alias: str | None = None) -> LayerTarget:
    for pattern, sparsity in config.per_layer.items():
        if fnmatch.fnmatchcase(name, pattern) or (alias and fnmatch.fnmatchcase(alias, pattern)):
            return LayerTarget(float(sparsity))
    if config.nm is not None:
        n, m = _parse_nm(config.nm)
        return LayerTarget(1.0 - n / m, n, m)
    return LayerTarget(float(config.sparsity))


def _input_key(module: nn.Module) -> tuple:
    """Layers with equal keys fed the same tensor have the same ``H``."""
    if isinstance(module, CONVS):
        return (
            "conv",
            module.in_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(conv_padding(module)),
            tuple(module.dilation),
            module.padding_mode,
        )
    return ("dense", input_width(module))


def _param_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _layer_input(args: tuple, kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


# --- the per-layer solver --------------------------------------------------------------------


class _Hessian:
    """Running ``H = 2/n · Σ xxᵀ`` over the rows fed to one or more layers of a step, and with
    ``cross`` the running ``C = 2/n · Σ x_dense xᵀ`` against the dense model's rows."""

    def __init__(self, cols: int, device: torch.device, cross: bool = False) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.cross = torch.zeros_like(self.sum) if cross else None
        self.rows = 0
        self.last: Any = None  # the tensor added last, so shared inputs are counted once

    def add(self, module: nn.Module, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        if x is self.last:
            return
        self.last = x
        cols = input_rows(module, x).to(self.sum.device)
        self.sum.addmm_(cols.t(), cols)
        if self.cross is not None:
            if dense is None or dense.shape != x.shape:
                raise ConfigError(
                    "dense_targets: the dense model fed a layer a different input shape than "
                    "the pruned one: leave dense_targets off for this model"
                )
            self.cross.addmm_(input_rows(module, dense).to(self.sum.device).t(), cols)
        self.rows += cols.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / self.rows)

    def cross_value(self) -> torch.Tensor:
        assert self.cross is not None
        return self.cross * (2.0 / self.rows)


# --- the sequential driver -------------------------------------------------------------------


def _hooked(
    modules: Mapping[str, nn.Module], hook: Callable[[str, nn.Module, Any], None]
) -> list[Any]:
    handles = []
    for name, module in modules.items():

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
            hook(_name, mod, _layer_input(args, kwargs))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return handles


def _record_steps(
    model: nn.Module,
    layers: dict[str, nn.Module],
    first_batch: Any,
    stacks: Mapping[str, str] | None = None,
) -> tuple[list[list[str]], dict[str, int]]:
    """Run one batch; return the layers in execution order, grouped into steps, and how often
    each was called. Consecutive layers called once on the very same tensor share a step.
    Expert ``stacks`` (parameter name → module name) are steps of their own, placed where they
    first multiply rows; their count is how often their module ran."""
    stacks = stacks or {}
    events: list[tuple[str, bool]] = []
    calls: dict[str, int] = {}
    last: list[Any] = [None]

    def hook(name: str, _module: nn.Module, x: Any) -> None:
        events.append((name, x is not None and x is last[0]))
        calls[name] = calls.get(name, 0) + 1
        last[0] = x

    def stack_seen(name: str) -> None:
        events.append((name, False))
        last[0] = None

    owners = {module_name: model.get_submodule(module_name) for module_name in stacks.values()}
    runs = dict.fromkeys(owners, 0)

    def count(module_name: str) -> Any:
        return lambda *_: runs.__setitem__(module_name, runs[module_name] + 1)

    handles = _hooked(layers, hook)
    handles += [m.register_forward_pre_hook(count(n)) for n, m in owners.items()]
    watch = FirstUse(model, list(stacks), stack_seen) if stacks else contextlib.nullcontext()
    try:
        with watch:
            call_model(model, first_batch)
    finally:
        for handle in handles:
            handle.remove()
        last[0] = None
    calls.update({name: runs[stacks[name]] for name, _ in events if name in stacks})
    steps: list[list[str]] = []
    placed: set[str] = set()
    for j, (name, same_input) in enumerate(events):
        if name in placed:
            continue  # a later call of a layer already placed
        placed.add(name)
        joins = same_input and steps and events[j - 1][0] in steps[-1]
        if joins and calls[name] == 1 and all(calls[s] == 1 for s in steps[-1]):
            steps[-1].append(name)
        else:
            steps.append([name])
    return steps, calls


def _accumulate(
    model: nn.Module,
    step: dict[str, nn.Module],
    calls: dict[str, int],
    calibration: Any,
    device: torch.device,
    max_batches: int | None,
    reference: nn.Module | None = None,
) -> dict[str, _Hessian]:
    """``H`` of every layer of ``step`` (layers on one input share one), each forward pass
    stopped once all of them have seen their inputs. With a dense ``reference`` model, each
    batch runs through it first (just as far) so that ``C`` pairs its inputs with the pruned
    model's, call for call."""
    shared: dict[tuple, _Hessian] = {}
    hessians: dict[str, _Hessian] = {}
    for name, module in step.items():
        key = _input_key(module)
        if key not in shared:
            shared[key] = _Hessian(input_width(module), module.weight.device, reference is not None)
        hessians[name] = shared[key]
    seen = dict.fromkeys(step, 0)
    dense_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in step}

    def hook(name: str, module: nn.Module, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"layer {name} was called without a tensor input: exclude it")
        dense = dense_inputs[name][seen[name]] if reference is not None else None
        hessians[name].add(module, x, dense)
        seen[name] += 1
        if all(seen[n] >= calls[n] for n in step):
            raise StopForward

    def dense_hook(name: str, _module: nn.Module, x: Any) -> None:
        dense_inputs[name].append(x)
        if all(len(dense_inputs[n]) >= calls[n] for n in step):
            raise StopForward

    handles = _hooked(step, hook)
    if reference is not None:
        handles += _hooked({n: reference.get_submodule(n) for n in step}, dense_hook)
    try:
        for inputs, _ in iter_calibration(calibration, device=device, max_batches=max_batches):
            seen.update(dict.fromkeys(step, 0))
            if reference is not None:
                for found in dense_inputs.values():
                    found.clear()
                with contextlib.suppress(StopForward):
                    call_model(reference, inputs)
            with contextlib.suppress(StopForward):
                call_model(model, inputs)
            for h in shared.values():
                h.last = None
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def prune_sparsegpt_(
    model: nn.Module, config: SparseGPTConfig, calibration: Any, *, progress: bool = False
) -> MaskSet:
    """Prune ``model`` in place with SparseGPT and return the keep-masks of the pruned weights.

    Layers are pruned one step at a time in the order the model runs them (recorded on the
    first calibration batch); layers fed the very same tensor (q/k/v projections) share a step.
    Each step's ``H`` is built from the calibration data passed through the model as pruned so
    far, each forward pass being cut short once the step's layers have seen their inputs; only
    that step's ``H`` is held in memory and no activation is stored. The model runs in eval
    mode under ``torch.no_grad`` on its parameters' device; every module's training flag is
    restored afterwards. Arithmetic is float32; weights are written back in their own dtype.

    Args:
        model: the network; its Linear, Conv (groups=1) and HF ``Conv1D`` layers and its
            stacked MoE expert weights are pruned.
        config: what to prune and how (:class:`SparseGPTConfig`).
        calibration: a re-iterable set of batches, as :func:`secateur._calibration.iter_calibration`
            reads it (a list of ``(inputs, targets)`` pairs or bare inputs, tensors, tuples or
            dicts of keyword tensors, or a data ``Split``).
        progress: show a progress bar, one tick per layer.

    Returns:
        A :class:`MaskSet` keyed ``"<module>.weight"`` (an expert stack by its parameter
        name; ``True`` = kept) over the pruned layers;
        layers at sparsity 0 get an all-True mask. Excluded layers, grouped convs and layers
        that never ran are absent.

    Raises:
        ConfigError: no calibration data, or a one-shot iterator; a bad config; an ``N:M``
            whose ``M`` does not divide a layer's input width (raised before anything changes);
            no prunable layer left; a layer whose ``H`` is not positive definite (earlier layers
            stay pruned).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> masks = prune_sparsegpt_(net, SparseGPTConfig(nm="2:4"), [torch.randn(64, 16)])
        >>> round(masks.sparsity(), 2)
        0.5
    """
    if not isinstance(config, SparseGPTConfig):
        raise ConfigError(f"config must be a SparseGPTConfig, not {type(config).__name__}")
    layers = _prunable(model, config.exclude)
    stacks = _stacks(model, config.exclude)
    if not layers and not stacks:
        raise ConfigError(
            "no Linear, Conv (groups=1), HF Conv1D or expert weights to prune: check the model "
            "and `exclude`"
        )
    targets = {name: _target(name, config) for name in layers}
    targets.update({name: _target(name, config, alias) for name, alias in stacks.items()})
    widths = {name: input_width(module) for name, module in layers.items()}
    widths.update({name: stack_width(model, name) for name in stacks})
    for name, width in widths.items():
        m = targets[name].m
        if m and width % m:
            raise ConfigError(
                f"layer {name} has {width} input columns, not a multiple of M={m} "
                f"of nm={config.nm!r}: exclude it (exclude=({name!r},)) or set per_layer={{{name!r}: 0.5}}"
            )
    if isinstance(calibration, Iterator):
        raise ConfigError(
            "calibration must be re-iterable (SparseGPT reads it once per layer): pass a list of batches or a data split"
        )
    device = next(iter(model.parameters())).device
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return _prune(model, config, calibration, layers, stacks, targets, device, progress)
    finally:
        for module, training in modes.items():
            module.training = training


def _prune(
    model: nn.Module,
    config: SparseGPTConfig,
    calibration: Any,
    layers: dict[str, nn.Module],
    stacks: dict[str, str],
    targets: dict[str, LayerTarget],
    device: torch.device,
    progress: bool,
) -> MaskSet:
    first = next(iter(iter_calibration(calibration, device=device, max_batches=1)), None)
    if first is None:
        raise ConfigError("calibration holds no batch: pass at least one batch of inputs")
    steps, calls = _record_steps(model, layers, first[0], stacks)
    del first
    idle = [name for name in [*layers, *stacks] if name not in calls]
    if len(idle) == len(layers) + len(stacks):
        raise ConfigError(
            "none of the prunable layers ran on the calibration inputs: check the inputs and `exclude`"
        )
    masks: dict[str, torch.Tensor] = {}
    for name in layers:
        if name in calls and targets[name].sparsity == 0.0:
            masks[_param_name(name)] = torch.ones_like(layers[name].weight, dtype=torch.bool)
    for name in stacks:
        if name in calls and targets[name].sparsity == 0.0:
            masks[name] = torch.ones_like(model.get_parameter(name), dtype=torch.bool)
    unseen: dict[str, list[int]] = {}
    steps = [[n for n in step if targets[n].sparsity > 0.0] for step in steps]
    steps = [step for step in steps if step]
    reference = copy.deepcopy(model) if config.dense_targets else None
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("SparseGPT", total=sum(len(s) for s in steps), status="")
        for step in steps:
            if step[0] in stacks:
                bar.update(task, status=step[0])
                masks[step[0]], experts = prune_stack(
                    model,
                    step[0],
                    targets[step[0]],
                    calls[step[0]],
                    calibration,
                    device=device,
                    max_batches=config.max_batches,
                    blocksize=config.blocksize,
                    damp=config.damp,
                )
                if experts:
                    unseen[step[0]] = experts
                bar.advance(task)
                continue
            modules = {name: layers[name] for name in step}
            hessians = _accumulate(
                model, modules, calls, calibration, device, config.max_batches, reference
            )
            for name, module in modules.items():
                bar.update(task, status=name)
                if hessians[name].rows == 0:
                    idle.append(name)
                else:
                    w = weight_matrix(module)
                    h = hessians[name].value()
                    if reference is not None:
                        w = retarget(w, h, hessians[name].cross_value(), config.damp)
                    pruned = sparsegpt_matrix(
                        w, h, targets[name], config.blocksize, config.damp, name
                    )
                    module.weight.copy_(to_weight_shape(module, w).to(module.weight.dtype))
                    masks[_param_name(name)] = to_weight_shape(module, ~pruned)
                bar.advance(task)
            del hessians
    warn_unseen(unseen)
    if idle:
        warnings.warn(
            f"SparseGPT left {', '.join(idle)} dense: never run on the calibration inputs",
            stacklevel=3,
        )
    return MaskSet(model, masks)
