"""Depth pruning: replace whole residual blocks (ResNet blocks, transformer layers) by a skip.

Candidates are discovered by running the model once on example inputs, never configured:

1. every child of an ``nn.Sequential`` or ``nn.ModuleList`` (at any depth) that holds
   parameters, is not itself such a container, is called exactly once, and whose main input
   (first positional tensor, or ``hidden_states=``) has the shape of its main output (the
   output tensor, or the first element of a tuple output);
2. that is residual: the autograd graph of its output reaches its input through additions and
   shape- or value-preserving pointwise steps only (add, ReLU/GELU/SiLU, dropout, casts,
   views, LayerNorm), with at least one addition on the way. This is measured on the forward
   pass, so a plain ``Linear(8, 8)`` or a BatchNorm inside a projection shortcut, whose output
   does not carry its input through, is not a candidate;
3. and that, replaced by :class:`Skip`, leaves the model's forward running with outputs of
   unchanged shapes (tried for each block on its own).

A block inside another candidate is dropped in favour of the outer one: depth pruning removes
whole layers. The first block of a container whose blocks are called with a KV cache (an
argument with ``get_seq_length``, as Hugging Face decoders pass) is kept: the cache reports the
sequence length from the first layer's slot, which a skipped layer would leave empty, and
incremental decoding would then use wrong positions. Each candidate is scored by its influence on the example inputs, ``1 - mean
cosine similarity`` between its input and output: a 3-D tensor is read as ``(batch, tokens,
features)`` and compared per token over the last dim, any other tensor is flattened per sample.
The least influential blocks go first.

Removal is physical but keeps indices: the block is replaced in its container by
:class:`Skip`, so ``nn.ModuleList`` lengths, ``layer_idx`` attributes and configs that slice
``layers[: num_hidden_layers]`` stay valid, and the state dict simply loses the block's tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._config import check_range, config_from_dict, config_to_dict
from .._inputs import call_model
from ..errors import ConfigError

_CONTAINERS = (nn.Sequential, nn.ModuleList)

# autograd nodes a skip path may cross: additions plus steps that keep the input's identity
_ADDS = frozenset({"AddBackward", "SubBackward"})
_PASS_THROUGH = _ADDS | frozenset(
    {
        "ReluBackward",
        "ThresholdBackward",
        "GeluBackward",
        "SiluBackward",
        "HardtanhBackward",
        "LeakyReluBackward",
        "EluBackward",
        "NativeDropoutBackward",
        "CloneBackward",
        "ToCopyBackward",
        "ViewBackward",
        "UnsafeViewBackward",
        "ReshapeAliasBackward",
        "NativeLayerNormBackward",
    }
)


class Skip(nn.Module):
    """Stands in for a removed block: returns its input unchanged.

    ``forward(*args, **kwargs)`` returns the first positional argument (or ``hidden_states=``
    when there is none). With ``tuple_len=n`` it returns ``(x, None, ...)`` of length ``n``,
    for blocks whose callers unpack a tuple. It has no parameters or buffers.

    Example:
        >>> x = torch.ones(2, 3)
        >>> Skip()(x, attention_mask=None) is x
        True
        >>> Skip(tuple_len=2)(x)[1] is None
        True
    """

    def __init__(self, tuple_len: int | None = None) -> None:
        super().__init__()
        if tuple_len is not None and (isinstance(tuple_len, bool) or tuple_len < 1):
            raise ValueError(f"tuple_len={tuple_len!r} must be None or an integer >= 1")
        self.tuple_len = tuple_len

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            x = args[0]
        elif "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
        else:
            raise TypeError("Skip needs its input as the first positional argument")
        if self.tuple_len is None:
            return x
        return (x,) + (None,) * (self.tuple_len - 1)

    def extra_repr(self) -> str:
        return "" if self.tuple_len is None else f"tuple_len={self.tuple_len}"


@dataclass(frozen=True)
class DepthConfig:
    """Replace ``ratio`` of the discovered residual blocks by :class:`Skip`, least influential first.

    Attributes:
        ratio: fraction in [0, 1) of the candidate blocks to remove, ``round(ratio * n)``
            blocks; a container always keeps at least one real block.
        ignore: fnmatch patterns of module names; a block whose name, or the name of a module
            inside it, matches one is never removed.
    """

    ratio: float = 0.25
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        if isinstance(self.ignore, str) or not all(isinstance(p, str) for p in self.ignore):
            raise ConfigError(f"ignore={self.ignore!r} must be a list of module-name patterns")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DepthConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class DepthResult:
    """What depth pruning found and removed.

    Attributes:
        candidates: names of the residual blocks discovered, in module order.
        removed: names of the blocks replaced by :class:`Skip`, in module order.
        scores: influence of every candidate (``1 - mean cosine similarity``; lower = removed first).
    """

    candidates: tuple[str, ...]
    removed: tuple[str, ...]
    scores: dict[str, float] = field(default_factory=dict)


def skipped_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that are :class:`Skip`, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, Skip) and name]


def replace_with_skip_(model: nn.Module, name: str, tuple_len: int | None = None) -> Skip:
    """Replace the submodule ``name`` of ``model`` by a :class:`Skip` in place and return it.

    Raises:
        KeyError: ``name`` is empty or names no submodule.
    """
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if not name or parent is None or child not in parent._modules:
        raise KeyError(name)
    skip = Skip(tuple_len)
    setattr(parent, child, skip)
    return skip


# ---------------------------------------------------------------------------------------------
# discovery


@dataclass
class _Probe:
    """What one run saw of one container child."""

    calls: int = 0
    target: tuple[Any, int] | None = None  # (autograd node, output_nr) of the input
    residual: bool = False
    same_shape: bool = False
    tuple_len: int | None = None
    cached: bool = False  # called with a KV cache (an object with ``get_seq_length``)
    influence: float = float("nan")
    _input: torch.Tensor | None = None


def _main_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, Any]:
    """The block's main input and where it came from (an arg index or a kwarg name)."""
    if args:
        return (args[0], 0) if isinstance(args[0], torch.Tensor) else (None, None)
    x = kwargs.get("hidden_states")
    return (x, "hidden_states") if isinstance(x, torch.Tensor) else (None, None)


def _main_output(out: Any) -> tuple[torch.Tensor | None, int | None]:
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], len(out)
    return None, None


def _influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - mean cosine similarity``, per token for 3-D tensors, per sample otherwise."""
    x, y = x.detach().float(), y.detach().float()
    if x.dim() == 3:
        sim = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    else:
        flat = (x.shape[0], -1) if x.dim() > 1 else (1, -1)
        sim = torch.nn.functional.cosine_similarity(x.reshape(flat), y.reshape(flat), dim=1)
    return float(1.0 - sim.mean())


def _reaches(out: torch.Tensor, target: tuple[Any, int]) -> bool:
    """Whether ``out``'s graph reaches ``target`` through pass-through nodes with an add."""
    start = out.grad_fn
    if start is None:
        return False
    stack, seen = [(start, False)], set()
    while stack:
        node, added = stack.pop()
        base = type(node).__name__.rstrip("0123456789")
        if base not in _PASS_THROUGH or (id(node), added) in seen:
            continue
        seen.add((id(node), added))
        added = added or base in _ADDS
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            if added and nxt is target[0] and nr == target[1]:
                return True
            stack.append((nxt, added))
    return False


def _shapes(out: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor in a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, Mapping):
        return [s for v in out.values() for s in _shapes(v)]
    if isinstance(out, (tuple, list)):
        return [s for v in out for s in _shapes(v)]
    return []


def _container_children(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{child name: (container name, child)}`` for every child of a Sequential/ModuleList."""
    children = {}
    for name, module in model.named_modules():
        if not isinstance(module, _CONTAINERS):
            continue
        for key, child in module.named_children():
            children[f"{name}.{key}" if name else key] = (name, child)
    return children


def _probe(model: nn.Module, names: dict[str, nn.Module], inputs: Any) -> tuple[dict, Any]:
    """One forward pass with grad on, hooks on every child in ``names``."""
    probes = {name: _Probe() for name in names}
    handles = []

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            p = probes[name]
            p.calls += 1
            p.cached = p.cached or any(
                callable(getattr(v, "get_seq_length", None)) for v in (*args, *kwargs.values())
            )
            x, where = _main_input(args, kwargs)
            if p.calls > 1 or x is None or not x.is_floating_point():
                return None
            p._input = x.detach().clone()
            if x.grad_fn is None:
                # no history to follow: start one here (clone, so in-place use stays legal)
                x = (x if x.requires_grad else x.detach().requires_grad_(True)).clone()
                if where == 0:
                    args = (x, *args[1:])
                else:
                    kwargs = {**kwargs, where: x}
            p.target = (x.grad_fn, x.output_nr)
            return args, kwargs

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any):
            p = probes[name]
            x, p._input = p._input, None
            target, p.target = p.target, None  # do not keep the graph alive
            y, p.tuple_len = _main_output(out)
            if p.calls > 1 or x is None or y is None or y.shape != x.shape:
                return
            p.same_shape = True
            p.residual = target is not None and _reaches(y, target)
            p.influence = _influence(x, y)

        return hook

    try:
        for name, module in names.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
        with torch.enable_grad():
            out = call_model(model, inputs)
        shapes = _shapes(out)
    finally:
        for h in handles:
            h.remove()
    return probes, shapes


def _runs_without(model: nn.Module, name: str, tuple_len: int | None, inputs: Any, shapes) -> bool:
    """Whether the model still runs, with outputs of the same shapes, with ``name`` skipped."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = parent._modules[child]
    setattr(parent, child, Skip(tuple_len))
    try:
        with torch.no_grad():
            return _shapes(call_model(model, inputs)) == shapes
    except Exception:  # any failure means the block cannot simply be skipped
        return False
    finally:
        setattr(parent, child, original)


def find_blocks(
    model: nn.Module, example_inputs: Any, ignore: tuple[str, ...] = ()
) -> tuple[dict[str, float], dict[str, int | None]]:
    """Discover the residual blocks of ``model`` (see the module docstring) and score them.

    Returns ``({name: influence}, {name: tuple_len})`` for every candidate, in module order.
    The model is run in eval mode and left in the train/eval state it had.
    """
    children = _container_children(model)
    names = {
        name: child
        for name, (_, child) in children.items()
        if not isinstance(child, (*_CONTAINERS, Skip))
        and any(True for _ in child.parameters())
        and not _ignored(name, child, ignore)
    }
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        probes, shapes = _probe(model, names, example_inputs)
        found = [n for n, p in probes.items() if p.calls == 1 and p.same_shape and p.residual]
        found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
        # a KV cache reads the sequence length from the first layer's slot, so that layer stays
        firsts = {}
        for name, (container, _) in children.items():
            firsts.setdefault(container, name)
        found = [n for n in found if not (probes[n].cached and firsts[children[n][0]] == n)]
        found = [
            n for n in found if _runs_without(model, n, probes[n].tuple_len, example_inputs, shapes)
        ]
    finally:
        for m, training in modes.items():
            m.training = training
    return {n: probes[n].influence for n in found}, {n: probes[n].tuple_len for n in found}


def _ignored(name: str, block: nn.Module, patterns: tuple[str, ...]) -> bool:
    if not patterns:
        return False
    inside = [f"{name}.{sub}" if sub else name for sub, _ in block.named_modules()]
    return any(fnmatch.fnmatchcase(n, p) for n in inside for p in patterns)


def prune_depth_(
    model: nn.Module,
    config: DepthConfig,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any] | None,
) -> DepthResult:
    """Replace the least influential residual blocks of ``model`` by :class:`Skip`, in place.

    ``example_inputs`` is a tensor, a sequence of positional tensors, or a mapping of keyword
    inputs (e.g. ``{"input_ids": ids, "attention_mask": mask}``).

    Example:
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> net = nn.Sequential(Res(), Res(), Res(), Res())
        >>> result = prune_depth_(net, DepthConfig(ratio=0.5), torch.randn(2, 4))
        >>> len(result.candidates), len(result.removed)
        (4, 2)

    Raises:
        ConfigError: ``example_inputs`` is missing.
    """
    if example_inputs is None:
        raise ConfigError("depth pruning needs example_inputs: pass example_inputs=x")
    scores, tuple_lens = find_blocks(model, example_inputs, config.ignore)
    candidates = tuple(scores)
    budget = int(round(config.ratio * len(candidates)))
    children = _container_children(model)
    alive = {}  # container name -> real blocks it still holds
    for container, child in children.values():
        alive[container] = alive.get(container, 0) + (not isinstance(child, Skip))
    chosen = set()
    for name in sorted(candidates, key=lambda n: scores[n]):  # stable: ties in module order
        if len(chosen) == budget:
            break
        container = children[name][0]
        if alive[container] > 1:
            alive[container] -= 1
            chosen.add(name)
    removed = tuple(n for n in candidates if n in chosen)
    for name in removed:
        replace_with_skip_(model, name, tuple_lens[name])
    return DepthResult(candidates, removed, dict(scores))
