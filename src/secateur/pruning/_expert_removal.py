"""Whole-expert removal from mixture-of-experts layers: the experts the router uses least go,
physically, with their router rows.

An MoE layer here is a module holding stacked expert weights (:mod:`secateur._experts`, in any
layout) and, beside it in the same parent, its router: a module whose ``weight`` (or whose
direct child's, as HunYuan's ``gate.wg``) is ``(experts, hidden)``.
Removing expert ``e`` slices entry ``e`` off every stack and every other tensor of the experts
module and of the router (its children included) whose leading axis counts the experts
(biases, DeepSeek's and Ernie's score corrections), and lowers every expert count attribute
(``num_experts`` and kin) of the experts module, the router and their parent. The router then chooses its top-k among the experts left.

Scores come from the calibration data, read where transformers' experts modules receive them,
``experts(hidden_states, top_k_index, top_k_weights)``:

- ``mass``: the routing weight each expert received, summed over tokens (how much of the
  layer's output it makes);
- ``frequency``: how many tokens were routed to it;
- ``random``: seeded uniform scores, the control the others should beat.

An expert the calibration never reached scores 0 and goes first. The model is run once more
after the removal; a layer whose code breaks on fewer experts is restored and named in the
error. Routing normalised after the top-k (Mixtral) gives tokens that never chose a removed
expert exactly the output they had; a softmax over all experts kept unnormalised (Qwen2-MoE's
default) shifts every token's weights slightly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._calibration import iter_calibration
from .._config import check_range, config_from_dict, config_to_dict
from .._experts import EXPERT_COUNTS, expert_stacks
from .._inputs import call_model
from ..errors import ConfigError

CRITERIA = ("mass", "frequency", "random")


@dataclass(frozen=True)
class ExpertConfig:
    """Remove whole experts from every mixture-of-experts layer.

    Attributes:
        ratio: fraction in [0, 1) of each layer's experts to remove (rounded down); at least
            the router's top-k experts always stay.
        criterion: ``mass`` (routing weight received), ``frequency`` (tokens received) or
            ``random`` (the control; the routing is still read, to check the model runs).
        exclude: fnmatch patterns of experts module names to leave whole.
    """

    ratio: float = 0.25
    criterion: str = "mass"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(
                f"exclude={self.exclude!r} must be a sequence of fnmatch patterns, e.g. "
                "('model.layers.0.*',)"
            )
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"criterion={self.criterion!r} is not an expert criterion: choose "
                f"{' or '.join(CRITERIA)}"
            )
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class ExpertResult:
    """What :func:`prune_experts_` removed.

    Attributes:
        removed: experts module name → indices of the experts removed (original numbering).
        scores: experts module name → every expert's score, original numbering.
        params_before, params_after: parameter counts of the whole model.
    """

    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scores: dict[str, tuple[float, ...]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0


@dataclass
class _Layer:
    name: str
    experts: nn.Module
    router_name: str
    router: nn.Module
    scorer: nn.Module  # the router itself, or its child holding the (experts, hidden) weight
    count: int


def _scores_experts(module: nn.Module, count: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[0] == count
        and not isinstance(module, nn.Embedding)
    )


def moe_layers(model: nn.Module) -> list[_Layer]:
    """Every experts module of ``model`` with its router, in module order."""
    layers = []
    stacks = expert_stacks(model, any_layout=True)
    for module_name in dict.fromkeys(m for m, _ in stacks.values()):
        experts = model.get_submodule(module_name)
        count = next(
            model.get_parameter(n).shape[0] for n, (m, _) in stacks.items() if m == module_name
        )
        parent_name = module_name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        for child_name, child in parent.named_children():
            if child is experts:
                continue
            inner = [c for c in child.children() if _scores_experts(c, count)]
            scorer = child if _scores_experts(child, count) else (inner[0] if inner else None)
            if scorer is not None:
                router_name = f"{parent_name}.{child_name}" if parent_name else child_name
                layers.append(_Layer(module_name, experts, router_name, child, scorer, count))
                break
    return layers


class _Routing:
    """Forward pre-hook on an experts module: adds up tokens and routing weight per expert."""

    def __init__(self, count: int) -> None:
        self.frequency = torch.zeros(count, dtype=torch.float64)
        self.mass = torch.zeros(count, dtype=torch.float64)
        self.seen = False

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        if len(args) < 3:
            return
        index, weights = args[1], args[2]
        if not (isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor)):
            return
        if index.is_floating_point() or index.shape != weights.shape:
            return
        ids = index.detach().reshape(-1).long().cpu()
        valid = (ids >= 0) & (ids < self.frequency.numel())
        ids = ids[valid]
        mass = weights.detach().reshape(-1).double().cpu()[valid]
        self.frequency.index_add_(0, ids, torch.ones_like(mass))
        self.mass.index_add_(0, ids, mass)
        self.seen = True


def _routing_scores(
    model: nn.Module, layers: list[_Layer], calibration: Any, criterion: str
) -> dict[str, torch.Tensor]:
    routing = {layer.name: _Routing(layer.count) for layer in layers}
    handles = [layer.experts.register_forward_pre_hook(routing[layer.name]) for layer in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for inputs, _ in iter_calibration(calibration, device=device):
                call_model(model, inputs)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ConfigError("the calibration data holds no batch: pass at least one batch")
    unseen = [name for name, r in routing.items() if not r.seen]
    if unseen:
        raise ConfigError(
            f"the experts of {', '.join(unseen)} were not called as experts(hidden_states, "
            "top_k_index, top_k_weights), so their routing cannot be read: exclude them"
        )
    if criterion == "random":
        generator = torch.Generator().manual_seed(0)
        return {
            name: torch.rand(r.mass.numel(), generator=generator) for name, r in routing.items()
        }
    return {name: getattr(r, criterion) for name, r in routing.items()}


def _expert_axis(tensor: torch.Tensor, count: int) -> int | None:
    """The axis that counts the experts: the first of size ``count`` after leading 1s (a
    stack's or router's axis 0, the last of Ernie's ``(1, experts)`` score bias)."""
    for axis, size in enumerate(tensor.shape):
        if size == count:
            return axis
        if size != 1:
            return None
    return None


def _slice_experts_(module: nn.Module, count: int, keep: torch.Tensor) -> None:
    """Keep experts ``keep`` in every parameter and buffer of ``module`` that counts them."""
    for name, param in list(module.named_parameters(recurse=False)):
        axis = _expert_axis(param, count)
        if axis is not None:
            sliced = param.detach().index_select(axis, keep.nonzero()[:, 0].to(param.device))
            setattr(module, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        axis = None if buffer is None else _expert_axis(buffer, count)
        if axis is not None:
            module._buffers[name] = buffer.index_select(
                axis, keep.nonzero()[:, 0].to(buffer.device)
            )


def _lower_counts_(
    model: nn.Module, names: list[str], count: int, new: int, edits: dict[str, dict[str, int]]
) -> None:
    for module_name in names:
        module = model.get_submodule(module_name)
        for attr in EXPERT_COUNTS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == count:
                setattr(module, attr, new)
                edits.setdefault(module_name, {})[attr] = new


def _top_k(layer: _Layer, model: nn.Module) -> int:
    """How many experts each token meets: the router's, experts module's or block's count."""
    parent = model.get_submodule(layer.name.rpartition(".")[0])
    for module in (layer.router, layer.experts, parent):
        for attr in ("top_k", "num_experts_per_tok", "moe_k"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 1  # unknown: the forward check catches a layer left with too few


def prune_experts_(
    model: nn.Module, config: ExpertConfig, calibration: Any, *, check: Any = None
) -> ExpertResult:
    """Remove the lowest-scoring ``config.ratio`` of the experts of every MoE layer, in place.

    Args:
        calibration: re-iterable batches the model runs on to read the routing (required).
        check: inputs to run the pruned model on (default: the first calibration batch).

    Raises:
        ConfigError: no MoE layer (or all excluded), no calibration batch or a one-shot
            iterator, routing that cannot be read, or a layer whose code fails with fewer
            experts (then every layer is restored: the model is as it was).

    Example:
        >>> from secateur import create_model  # doctest: +SKIP
        >>> moe = create_model("hf.mixtral", task="causal-lm", num_local_experts=8)  # doctest: +SKIP
        >>> prune_experts_(moe, ExpertConfig(ratio=0.5), batches).removed  # doctest: +SKIP
    """
    if not isinstance(config, ExpertConfig):
        raise ConfigError(f"config must be an ExpertConfig, not {type(config).__name__}")
    layers = [
        layer
        for layer in moe_layers(model)
        if not any(fnmatch.fnmatchcase(layer.name, p) for p in config.exclude)
    ]
    if not layers:
        raise ConfigError(
            "no mixture-of-experts layer with stacked experts and a router beside them: check "
            "the model and `exclude`"
        )
    if calibration is None:
        raise ConfigError("expert removal reads the routing: pass calibration=batches")
    if isinstance(calibration, Iterator):
        raise ConfigError(
            "calibration must be re-iterable (read for the routing, then to check the model): "
            "pass a list of batches or a data split"
        )
    scores = _routing_scores(model, layers, calibration, config.criterion)
    before = sum(p.numel() for p in model.parameters())
    if check is None:
        device = next(model.parameters()).device
        check = next(iter(iter_calibration(calibration, device=device)))[0]
    modes = {module: module.training for module in model.modules()}
    removed: dict[str, tuple[int, ...]] = {}
    done: list[_Removal] = []
    try:
        for layer in layers:
            removal = _Removal(model, layer, scores[layer.name], config.ratio)
            if not removal.gone:
                continue
            done.append(removal)
            try:
                with torch.no_grad():
                    call_model(model.eval(), check)
            except Exception as exc:  # this layer's code needs the old count: undo them all
                for earlier in reversed(done):
                    earlier.undo()
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ConfigError(
                    f"{layer.name} fails with fewer experts ({type(exc).__name__}: {first}); "
                    f"nothing was removed: exclude it (exclude=({layer.name!r},))"
                ) from None
            removed[layer.name] = removal.gone
    finally:
        for module, training in modes.items():
            module.training = training
    edits: dict[str, dict[str, int]] = getattr(model, "secateur_attributes", {})
    for removal in done:
        for module_name, attrs in removal.edits.items():
            edits.setdefault(module_name, {}).update(attrs)
    if edits:
        model.secateur_attributes = edits
    return ExpertResult(
        removed=removed,
        scores={name: tuple(float(v) for v in s) for name, s in scores.items()},
        params_before=before,
        params_after=sum(p.numel() for p in model.parameters()),
    )


class _Removal:
    """Removes ``layer``'s lowest-scoring experts on construction (``gone``: their original
    indices, empty when none may go); :meth:`undo` puts everything back."""

    def __init__(self, model: nn.Module, layer: _Layer, scores: torch.Tensor, ratio: float):
        self.layer = layer
        self.edits: dict[str, dict[str, int]] = {}
        drop = min(int(ratio * layer.count), layer.count - _top_k(layer, model))
        self.gone: tuple[int, ...] = ()
        if drop <= 0:
            return
        order = torch.sort(scores, stable=True).indices
        gone = torch.sort(order[:drop]).values
        keep = torch.ones(layer.count, dtype=torch.bool)
        keep[gone] = False
        touched = dict.fromkeys([layer.experts, *layer.router.modules()])  # router's children too
        self.saved = {
            m: (dict(m.named_parameters(recurse=False)), dict(m._buffers)) for m in touched
        }
        names = [layer.name, layer.router_name, layer.name.rpartition(".")[0]]
        self.owners = {name: model.get_submodule(name) for name in names}
        for module in touched:
            _slice_experts_(module, layer.count, keep)
        if isinstance(layer.scorer, nn.Linear):
            layer.scorer.out_features = layer.count - drop
        _lower_counts_(model, names, layer.count, layer.count - drop, self.edits)
        self.gone = tuple(int(i) for i in gone)

    def undo(self) -> None:
        for module, (params, buffers) in self.saved.items():
            for name, param in params.items():
                setattr(module, name, param)
            module._buffers.update(buffers)
        if isinstance(self.layer.scorer, nn.Linear):
            self.layer.scorer.out_features = self.layer.count
        for name, module in self.owners.items():
            for attr in self.edits.get(name, {}):
                setattr(module, attr, self.layer.count)
