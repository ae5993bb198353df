"""Trace one eager forward pass into channel spaces and the modules that read and write them.

Why this approach: a ``TorchFunctionMode`` sees every torch call the Python code makes, with its
arguments (the dim of a ``cat``, the shape of a ``view``), so models with data-dependent Python
control flow trace as they run, which ``torch.fx`` symbolic tracing cannot do. Known leaf modules
(Conv, Linear, BatchNorm, Embedding) are recorded whole through forward hooks and their inner
calls ignored. Every other call is matched against a short list of ops whose channel mapping is
certain; anything else *blocks* the spaces it touches, so the engine refuses to prune through
what it does not understand instead of breaking the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._spaces import Layout, Segment, SpaceTable

# shape-preserving ops that act on each element alone (or on spatial positions only)
_POINTWISE = {
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "gelu",
    "silu",
    "silu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "elu_",
    "selu",
    "mish",
    "softplus",
    "dropout",
    "dropout_",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "clone",
    "contiguous",
    "detach",
    "to",
    "float",
    "half",
    "bfloat16",
    "double",
    "type_as",
    "neg",
    "abs",
    "exp",
    "sqrt",
    "rsqrt",
    "__neg__",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "hardsigmoid_",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "interpolate",
    "upsample",
    "pixel_unshuffle",
}
_BINARY = {
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "__add__",
    "__iadd__",
    "__radd__",
    "__sub__",
    "__isub__",
    "__rsub__",
    "__mul__",
    "__imul__",
    "__rmul__",
    "__truediv__",
    "__itruediv__",
    "__rtruediv__",
    "maximum",
    "minimum",
}
_RESHAPE = {"flatten", "view", "reshape"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_PERMUTE = {"permute", "transpose", "swapaxes", "movedim"}
_CAT = {"cat", "concat", "concatenate"}


@dataclass
class Trace:
    """What one forward pass showed: channel spaces and the module slices that use them."""

    table: SpaceTable


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.table = SpaceTable()
        self.layouts: dict[int, tuple[Layout, int]] = {}  # id(tensor) -> (layout, feature dim)
        self.keepalive: list[torch.Tensor] = []  # ids stay unique while tracing
        self.depth = 0
        self.called: dict[str, list[int]] = {}
        self.names = {m: n for n, m in model.named_modules()}

    # -- bookkeeping -------------------------------------------------------------------------
    def info(self, t: Any) -> tuple[Layout, int] | None:
        return self.layouts.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set(self, t: torch.Tensor, layout: Layout, dim: int) -> None:
        self.keepalive.append(t)
        self.layouts[id(t)] = (layout, dim % t.dim() if t.dim() else 0)

    def fresh(self, t: torch.Tensor, dim: int, *, blocked: str | None = None) -> None:
        if t.dim() == 0:
            return
        dim %= t.dim()
        self.set(t, (Segment(self.table.new(t.shape[dim], blocked=blocked)),), dim)

    def tracked(self, values: Sequence[Any]) -> list[torch.Tensor]:
        flat, _ = tree_flatten(list(values))
        return [v for v in flat if isinstance(v, torch.Tensor) and id(v) in self.layouts]

    def block_all(self, inputs: Sequence[torch.Tensor], outputs: Any, reason: str) -> None:
        for t in inputs:
            self.table.block_layout(self.layouts[id(t)][0], reason)
        for out in tree_flatten(outputs)[0]:
            if isinstance(out, torch.Tensor) and out.dim() > 0:
                self.fresh(out, -1 if out.dim() < 3 else 1, blocked=reason)

    # -- torch calls -------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.record(_name(func), args, kwargs, out)
        return out

    def record(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = self.tracked([args, kwargs])
        if not inputs or name in {
            "size",
            "dim",
            "numel",
            "__get__",
            "__len__",
            "is_floating_point",
        }:
            return
        if not isinstance(out, torch.Tensor):
            if name in {"split", "chunk", "unbind"} or isinstance(out, (tuple, list)):
                self.block_all(inputs, out, f"{name} is not followed yet")
            return
        x = inputs[0]
        layout, dim = self.layouts[id(x)]
        single = len(inputs) == 1
        rules = (
            (name in _POINTWISE and single, lambda: self.pointwise(x, layout, dim, out)),
            (name in _BINARY, lambda: self.binary(inputs, args, out)),
            (name in _RESHAPE and single, lambda: self.reshape(x, layout, dim, out)),
            (
                name in _PERMUTE and single,
                lambda: self.permute(x, name, args, kwargs, layout, dim, out),
            ),
            (name in _REDUCE and single, lambda: self.reduce(x, args, kwargs, layout, dim, out)),
            (name in _CAT, lambda: self.cat(args, kwargs, out)),
        )
        for applies, rule in rules:
            if applies and rule():
                return
        self.block_all(inputs, out, f"op '{name}' has no channel rule")

    def pointwise(self, x: torch.Tensor, layout: Layout, dim: int, out: torch.Tensor) -> bool:
        if out.dim() == x.dim() and out.shape[dim] == x.shape[dim]:
            self.set(out, layout, dim)
            return True
        return False

    def binary(self, inputs: list[torch.Tensor], args: tuple, out: torch.Tensor) -> bool:
        operands = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        if len(operands) == 2 and any(id(a) not in self.layouts for a in operands):
            other = next(a for a in operands if id(a) not in self.layouts)
            x = inputs[0]
            layout, dim = self.layouts[id(x)]
            aligned = dim - (out.dim() - other.dim())
            if aligned >= 0 and other.shape[aligned] != 1:
                return False  # a constant with its own per-channel values
            if x.dim() == out.dim() and x.shape[dim] == out.shape[dim]:
                self.set(out, layout, dim)
                return True
            return False
        if len(inputs) == 1:  # tensor with a Python scalar
            layout, dim = self.layouts[id(inputs[0])]
            if inputs[0].dim() == out.dim() and inputs[0].shape[dim] == out.shape[dim]:
                self.set(out, layout, dim)
                return True
            return False
        (la, da), (lb, db) = self.layouts[id(inputs[0])], self.layouts[id(inputs[1])]
        ea, eb = da + out.dim() - inputs[0].dim(), db + out.dim() - inputs[1].dim()
        if ea != eb or len(la) != 1 or len(lb) != 1 or la[0].factor != 1 or lb[0].factor != 1:
            return False
        size_a, size_b = inputs[0].shape[da], inputs[1].shape[db]
        if size_a == size_b == out.shape[ea]:
            root = self.table.unite(la[0].space, lb[0].space)
            self.set(out, (Segment(root),), ea)
            return True
        return False

    def reshape(self, x: torch.Tensor, layout: Layout, dim: int, out: torch.Tensor) -> bool:
        if out.shape == x.shape:
            self.set(out, layout, dim)
            return True
        # channels merged with the positions after them: (N, C, H, W) -> (N, C*H*W)
        if out.dim() == dim + 1 and tuple(out.shape[:dim]) == tuple(x.shape[:dim]):
            inner = math.prod(x.shape[dim + 1 :])
            self.set(out, tuple(Segment(s.space, s.factor * inner) for s in layout), dim)
            return True
        # leading dims merged, feature axis last and untouched: (B, T, F) -> (B*T, F)
        if dim == x.dim() - 1 and out.shape[-1] == x.shape[-1]:
            self.set(out, layout, out.dim() - 1)
            return True
        return False

    def permute(self, x, name, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        nd = x.dim()
        if name == "permute":
            order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            order = kwargs.get("dims", order)
            order = [int(o) % nd for o in order]
            self.set(out, layout, order.index(dim))
            return True
        if name == "movedim":
            return False  # rarely on a channel axis; block rather than guess
        pair = list(args[1:3]) or [kwargs.get("dim0"), kwargs.get("dim1")]
        if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
            return False
        a, b = (v % nd for v in pair)
        self.set(out, layout, b if dim == a else a if dim == b else dim)
        return True

    def reduce(self, x, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None:
            return False
        dims = [int(d) % x.dim() for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if dim in dims:
            return False
        keep = out.dim() == x.dim()
        self.set(out, layout, dim if keep else dim - sum(d < dim for d in dims))
        return True

    def cat(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        tensors = list(args[0])
        cat_dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
        infos = [self.info(t) for t in tensors]
        if any(i is None for i in infos):
            return False
        dims = {i[1] for i in infos}
        if len(dims) != 1:
            return False
        dim = dims.pop()
        if cat_dim == dim:
            self.set(out, tuple(seg for layout, _ in infos for seg in layout), dim)
            return True
        first = infos[0][0]
        if all(len(layout) == 1 and layout[0].factor == 1 for layout, _ in infos):
            root = first[0].space
            for layout, _ in infos[1:]:
                root = self.table.unite(root, layout[0].space)
            self.set(out, (Segment(root),), dim)
            return True
        return False

    # -- modules -----------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def post_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.depth -= 1
        if self.depth:
            return
        name = self.names[module]
        x = args[0] if args else None
        info = self.info(x)
        if name in self.called:
            # a module used twice would need its spaces kept equal; refuse rather than guess
            self.block_all([x] if info else [], out, f"module {name} is called more than once")
            for seg_space in self.called[name]:
                self.table.block(seg_space, f"module {name} is called more than once")
            return
        if isinstance(module, nn.Embedding) and isinstance(out, torch.Tensor):
            self.fresh(out, -1)
            self.table.add_member(self.layouts[id(out)][0], name, "embedding")
            self.called[name] = [s.space for s in self.layouts[id(out)][0]]
            return
        if info is None or not isinstance(out, torch.Tensor):
            if isinstance(out, torch.Tensor):
                self.fresh(out, 1 if out.dim() > 2 else -1, blocked=f"{name} reads untracked input")
            return
        layout, dim = info
        self.called[name] = [s.space for s in layout]
        role = _module_role(module, x, dim)
        if role is None:
            self.block_all([x], out, f"{type(module).__name__} {name} is not supported")
            return
        consumer, producer = role
        if producer in ("norm", "depthwise"):
            if consumer == "depthwise_in" and (len(layout) != 1 or layout[0].factor != 1):
                self.block_all([x], out, f"depthwise {name} reads a derived layout")
                return
            self.table.add_member(layout, name, producer)
            self.set(out, layout, dim)
            return
        self.table.add_member(layout, name, consumer)
        self.fresh(out, 1 if producer != "linear_out" else -1)
        self.table.add_member(self.layouts[id(out)][0], name, producer)
        self.called[name] += [s.space for s in self.layouts[id(out)][0]]


def _module_role(module: nn.Module, x: torch.Tensor, dim: int) -> tuple[str, str] | None:
    """(consumer role, producer role) of a known leaf module, or None when unsupported."""
    if isinstance(module, nn.Linear):
        return ("linear_in", "linear_out") if dim == x.dim() - 1 else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if dim != 1:
            return None
        if module.groups == 1:
            return "conv_in", "conv_out"
        if module.groups == module.in_channels == module.out_channels:
            return "depthwise_in", "depthwise"
        return None
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return ("convT_in", "convT_out") if dim == 1 and module.groups == 1 else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ("norm_in", "norm") if dim == 1 else None
    return None


_LEAVES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.modules.batchnorm._BatchNorm,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.MultiheadAttention,
)


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> Trace:
    """Run ``model`` once on ``example_inputs`` and record its channel spaces.

    Model inputs and outputs are blocked (their widths are fixed by the data and the task).
    LayerNorm, GroupNorm and MultiheadAttention are recorded as unsupported leaves for now:
    their spaces are blocked, never silently mis-pruned.
    """
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    tracer = _Tracer(model)
    for t in inputs:
        tracer.fresh(t, 1 if t.dim() > 2 else -1, blocked="model input")
    handles = []
    for m in model.modules():
        if isinstance(m, _LEAVES):
            handles.append(m.register_forward_pre_hook(tracer.pre_hook))
            handles.append(m.register_forward_hook(tracer.post_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for t in tree_flatten(out)[0]:
        info = tracer.info(t)
        if info is not None:
            tracer.table.block_layout(info[0], "model output")
    return Trace(tracer.table)
