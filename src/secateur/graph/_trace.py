"""Trace one eager forward pass into channel spaces and the modules that read and write them.

Why this approach: a ``TorchFunctionMode`` sees every torch call the Python code makes, with its
arguments (the dim of a ``cat``, the shape of a ``view``), so models with data-dependent Python
control flow trace as they run, which ``torch.fx`` symbolic tracing cannot do. Known leaf modules
(Conv, Linear, norms, Embedding, HF ``Conv1D``) are recorded whole through forward hooks and
their inner calls ignored. Every other call is matched against the rules in ``_ops``; anything
else *blocks* the spaces it touches, so the engine refuses to prune through what it does not
understand instead of breaking the model. Parameters used directly in ops (an RMSNorm weight, a
ViT position embedding, a ConvNeXt layer scale) become members of the space they meet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .._inputs import split_inputs
from ._copies import CopiedAxes
from ._filter_extras import STANDARDISING, add_filter_extras, can_shrink_per_group
from ._ops import (
    CAT,
    CONV_FN,
    ELEMENTWISE,
    GROUPED_MM,
    LINEAR_FN,
    MATMUL,
    NORM_FN,
    POINTWISE,
    REDUCE,
    RESHAPE,
    SOFTMAX,
    SPLIT,
    DeferredView,
    OpRules,
)
from ._params import (
    PARAM_PASS,
    PARAM_SHAPE,
    gathers_rows,
    indexed_by_numbers,
    indexed_dims,
    param_gather,
    param_index_select,
    reshaped_dims,
    scalar_arithmetic,
    single_number,
)
from ._shapes import PERMUTE, basic_selectors, dim_arg, index_axes, permute_order
from ._shuffle_rules import GroupedView
from ._spaces import Layout, Segment, SpaceTable
from ._uniform import FILLED, UniformTensors, made_sizes, storage_key, written
from ._width_notes import (
    WidthNote,
    bare_name_at,
    calling_frame,
    defined_in,
    expression_source,
    module_frames,
    names_at,
    names_in_use,
    shape_locals,
    shape_read_at,
    spelled_names,
)

_IGNORED = {"size", "dim", "numel", "__get__", "__len__", "is_floating_point", "__bool__"}
_SHAPE_KEEPING = {
    *("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"),
    *("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid"),
    *("tanh", "hardswish", "hardswish_", "hardsigmoid", "leaky_relu", "elu", "mish", "dropout"),
}
# new tensors shaped like their input, holding none of its values
_LIKE_NEW = {"zeros_like", "ones_like", "empty_like", "full_like"}
# x.new_zeros(shape) and kin: only x's dtype and device; a fresh constant
_NEW_FROM = {"new_zeros", "new_ones", "new_empty", "new_full"}
_FRESH = _NEW_FROM | {"zeros", "ones", "empty", "full"}
# ops whose second tensor gives only a dtype or a shape: the first one's channels pass
_LIKE = {"type_as", "expand_as", "view_as", "reshape_as"}


# the model's output shapes: None at an axis sized by the input's values, or None for all
OutputShapes = tuple[tuple[int | None, ...], ...] | None


@dataclass
class Trace:
    """What one forward pass showed: channel spaces, module slices, and width notes."""

    table: SpaceTable
    notes: list[WidthNote] = field(default_factory=list)
    output_shapes: OutputShapes = ()
    # (module, tensor, dim) read at fixed indices: no channel along it may be removed
    indexed: frozenset[tuple[str, str, int]] = frozenset()
    # sites of views to fold on another trace (see _Tracer.folded_split)
    folds_wanted: frozenset[tuple] = frozenset()


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D``: a Linear with its weight stored as ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class _Tracer(OpRules, TorchFunctionMode):
    def __init__(
        self, model: nn.Module, state: dict[str, torch.Tensor], folds: frozenset = frozenset()
    ) -> None:
        super().__init__()
        # where a view of the last axis into (blocks, per block) is folded: unit k is entry k
        # of every block (Gemma's per-layer embeddings, one block per layer); see folded_split
        self.folds = folds
        self.split_sites: list[tuple[int, tuple]] = []  # (coarse space, the view's site)
        self.folds_wanted: set[tuple] = set()
        self.table = SpaceTable()
        self.meta = bool(state)
        self.layouts: dict[int, tuple[Layout, int]] = {}  # id(tensor) -> (layout, feature dim)
        self.params: dict[int, tuple[str, str, tuple[int | None, ...]]] = {}
        # (module, tensor, dim) of a parameter read by F.linear -> the first space its rows wrote
        self.param_outputs: dict[tuple[str, str, int | None], int] = {}
        # views of parameters, with where they ran: their shape may spell a width
        self.param_views: dict[int, tuple[tuple, tuple, tuple]] = {}  # args, context, dims
        # shapes read from tracked tensors, by (code id, instruction): layout, channel axis,
        # number of axes and width
        self.shape_reads: dict[tuple[int, int], tuple[Layout, int, int, int]] = {}
        # where each parameter dim was first made a member: met again, the spaces unite
        self.param_layouts: dict[tuple[str, str, int | None], Layout] = {}
        # (module, parameter, dim) picked by index values: its entries may not be renumbered
        self.param_indexed: set[tuple[str, str, int]] = set()
        # parameters concatenated: cat axis and the pieces, in order
        self.param_cats: dict[int, tuple[int, tuple[torch.Tensor, ...]]] = {}
        # elementwise functions of several parameters of one shape: the parameters
        self.param_mixes: dict[int, tuple[torch.Tensor, ...]] = {}
        self.keepalive: list[torch.Tensor] = []  # ids stay unique while tracing
        # one channel taken out on its own (BART's ``inputs_embeds[:, :, -1]``, for its shape):
        # its channels stay prunable unless something reads its values
        self.picked: dict[int, Layout] = {}
        # basic-indexing slices, by id: (the tensor sliced, the index), for writes through them
        self.slice_views: dict[int, tuple[torch.Tensor, Any]] = {}
        self.views_by_storage: dict[int | None, list[torch.Tensor]] = {}  # untracked views
        # views taken from an untracked tensor before a write gave it channels, by id: that
        # tensor (they show its channels' values now, at places the trace never saw)
        self.stale: dict[int, torch.Tensor] = {}
        # tensors made fresh (zeros, empty, new_empty, ...): their sizes, where they were made
        self.fresh_made: dict[int, tuple[tuple, tuple | None]] = {}  # id -> (sizes, where)
        # untracked destinations: axes along which a write held a value per entry
        self.unchecked_writes: dict[int, set[int]] = {}
        # untracked tensors with the same values all along some axes (zeros of a head count)
        self.uniform = UniformTensors()
        # tensors, tracked or not, that hold copies of one value along some axes
        self.copies = CopiedAxes()
        self.uniform_layouts: dict[tuple[int, int], Layout] = {}  # by (call made, its axis)
        # (call made, its axis) of uniform tensors some op read by their width: they keep it
        self.uniform_read: dict[tuple[int, int], str] = {}
        self.uniform_used: set[tuple[int, int]] = set()  # (id, axis) the op being read took
        # the marks zeros/ones/full gave each tensor they made, by id (fresh_made keeps it)
        self.filled: dict[int, dict] = {}
        self.depth = 0
        self.stack: list[str] = []
        self.running: list[nn.Module] = []  # the modules of ``stack``
        self.notes: list[WidthNote] = []
        self.called: dict[str, list[int]] = {}
        # views settled by the op that reads them
        self.deferred: dict[int, DeferredView | GroupedView] = {}
        # parameter views whose axis indexes groups of entries (a bias viewed as heads)
        self.param_factors: dict[int, tuple[int, ...]] = {}
        # layer -> (input layout or None for a fixed input, output layout, output axis)
        self.layer_calls: dict[str, tuple[Layout | None, Layout, int]] = {}
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = {n: m for m, n in self.names.items()}
        self.standardising: set[int] = set()  # layers whose forward pools their weight's stats
        self.per_group: set[str] = set()  # grouped convs whose every group shrinks alike
        named = (
            state.items()
            if state
            else [
                (f"{m}.{p}" if m else p, t)
                for m, module in model.named_modules()
                for p, t in [
                    *module.named_parameters(recurse=False),
                    *module.named_buffers(recurse=False),
                ]
            ]
        )
        for full, t in named:
            mod_name, _, pname = full.rpartition(".")
            if t is not None and t.dim() > 0 and id(t) not in self.params:
                self.params[id(t)] = (mod_name, pname, tuple(range(t.dim())))

    # -- bookkeeping -------------------------------------------------------------------------
    def info(self, t: Any) -> tuple[Layout, int] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.deferred:
            self.settle(t)
        return self.layouts.get(id(t))

    def known(self, t: torch.Tensor) -> bool:
        """Whether ``t`` has channels, settled or not (unlike :meth:`info`, settles nothing)."""
        return id(t) in self.layouts or id(t) in self.deferred

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
        known = (self.layouts, self.deferred)
        return [v for v in flat if isinstance(v, torch.Tensor) and any(id(v) in k for k in known)]

    def block_all(self, inputs: Sequence[torch.Tensor], outputs: Any, reason: str) -> None:
        for t in inputs:
            if (info := self.info(t)) is not None:
                self.table.block_layout(info[0], reason)
        for out in tree_flatten(outputs)[0]:
            if isinstance(out, torch.Tensor) and out.dim() > 0:
                self.fresh(out, -1 if out.dim() < 3 else 1, blocked=reason)

    def add_param(
        self, t: Any, axis: int, layout: Layout, role: str = "param", *, leaf: bool = False
    ) -> bool:
        """Make the parameter behind untracked ``t`` (sliced along ``axis``) a member; for
        parameters concatenated (BEiT's ``cat((q_bias, k_bias, v_bias))``), each one with its
        piece of ``layout``; for a mix of parameters, each of them (``leaf``: ``t`` as the
        parameter it was before an in-place op mixed others into it)."""
        if isinstance(t, torch.Tensor) and id(t) in self.param_cats:
            return self.add_param_pieces(t, axis, layout, role)
        if not leaf and isinstance(t, torch.Tensor) and id(t) in self.param_mixes:
            parts = self.param_mixes[id(t)]
            return all(self.add_param(p, axis, layout, role, leaf=True) for p in parts)
        entry = self.params.get(id(t)) if isinstance(t, torch.Tensor) else None
        if entry is None or entry[2][axis] is None:
            return False
        module_name, pname, dims = entry
        view = self.param_views.get(id(t))
        if view is not None and dims[axis] in view[2]:  # the width of the view's axis
            at = view[2].index(dims[axis])
            self.note_literals(view[0], at, t.shape[axis], layout, view[1])
        factor = self.param_factors.get(id(t), (1,) * t.dim())[axis]
        if factor > 1:  # the axis indexes heads of ``factor`` parameter entries each
            layout = tuple(Segment(s.space, s.factor * factor) for s in layout)
        self.table.add_member(layout, module_name, role, tensor=pname, dim=dims[axis])
        # the same entries of one parameter, reached again from other channels: slicing them
        # once means those channels must be the same ones
        key = (module_name, pname, dims[axis])
        earlier = self.param_layouts.setdefault(key, layout)
        if earlier is not layout and self.unify(earlier, layout) is None:
            reason = f"{module_name}.{pname} is read by channels that do not line up"
            self.table.block_layout(earlier, reason)
            self.table.block_layout(layout, reason)
        return True

    def param_mix(self, name: str, args: tuple, out: Any) -> tuple[torch.Tensor, ...] | None:
        """The parameters behind ``out`` when it is an elementwise function of several of
        them, all of one shape (a frozen BatchNorm's ``weight * (running_var + eps).rsqrt()``),
        or of such a mix; each entry of ``out`` then belongs to the same channel as theirs."""
        if name not in POINTWISE and name not in ELEMENTWISE or not isinstance(out, torch.Tensor):
            return None
        tensors = [a for a in args[:3] if isinstance(a, torch.Tensor) and a.dim() > 0]
        if len(tensors) < 2 and not any(id(t) in self.param_mixes for t in tensors):
            return None
        if name in POINTWISE and len(tensors) > 1:  # p.to(q), p.type_as(q): q gives a dtype
            return None
        known = all(id(t) in self.params or id(t) in self.param_mixes for t in tensors)
        if not known or any(t.shape != out.shape for t in tensors):
            return None
        return tuple(leaf for t in tensors for leaf in self.param_mixes.get(id(t), (t,)))

    def follow_mix(self, name: str, args: tuple, out: Any, kwargs: dict | None) -> None:
        """A view or permute of a mix (Detectron2's frozen BatchNorm reshapes its scale after
        mixing it): each parameter behind it, seen through the same op, through a stand-in of
        the mix's shape carrying that parameter's entry."""
        if not isinstance(out, torch.Tensor):
            return
        viewed = []
        for leaf in self.param_mixes[id(args[0])]:
            # fresh tensors from shapes alone: nothing here reads the mix itself again
            stand = torch.empty(args[0].shape, device=args[0].device)
            seen = torch.empty(out.shape, device=out.device)
            self.keepalive += [stand, seen]
            self.params[id(stand)] = self.params[id(leaf)]
            for table in (self.param_views, self.param_factors):
                if id(leaf) in table:
                    table[id(stand)] = table[id(leaf)]  # type: ignore[index]
            self.follow_param(name, (stand, *args[1:]), seen, kwargs)
            if id(seen) not in self.params:
                return
            viewed.append(seen)
        self.param_mixes[id(out)] = tuple(viewed)
        self.keepalive.append(out)

    def add_param_pieces(self, t: torch.Tensor, axis: int, layout: Layout, role: str) -> bool:
        cat_axis, pieces = self.param_cats[id(t)]
        if axis == cat_axis:
            bounds = [sum(p.shape[axis] for p in pieces[:i]) for i in range(1, len(pieces))]
            layouts = self.split_layout(layout, bounds)
        else:
            layouts = [layout] * len(pieces)
        if layouts is None or len(layouts) != len(pieces):
            return False
        if any(self.params[id(p)][2][axis] is None for p in pieces):
            return False
        return all(self.add_param(p, axis, lt, role) for p, lt in zip(pieces, layouts, strict=True))

    def note_context(self) -> tuple | None:
        """Where a width is being read now: the running module, the names its code refers to,
        the source of the expression at hand in that code, whether the op ran in a function
        that code called rather than in the code itself, and the op's own frame (its code
        says which locals were read from a tensor's shape)."""
        if not self.stack:
            return None
        own = calling_frame()
        own_source = expression_source(own) if own is not None else ""
        owner = self.frame_owner(own, own_source)
        if owner is not None:  # a method of a module not running (timm's rel_pos.get_bias())
            frames = module_frames(owner)
            context = (own_source, own.f_code)
            return self.names[owner], names_in_use(frames), own_source, False, context
        frames = module_frames(self.running[-1])
        # a function defined in the module's code (LongT5's ``unshape``) can read any of its
        # attributes: what its own expression spells may have reached the op
        nested = own is not None and bool(frames) and defined_in(own.f_code, frames[0].f_code)
        passed = bool(frames) and own is not frames[0]
        where = own if passed and own is not None else frames[0] if frames else None
        if not frames:
            source = ""
        elif frames[0] is own or nested:
            source = own_source  # the op runs in the module's own code: read once
        else:
            source = expression_source(frames[0])
        own_source = own_source if passed and where is not None else source
        code = where.f_code if where is not None else None
        return self.stack[-1], names_in_use(frames), source, passed, (own_source, code)

    def frame_owner(self, frame: Any, source: str) -> nn.Module | None:
        """The model's module whose method ``frame`` runs (its first argument), when that is
        not the running module and the expression at hand reads that module's own attributes
        (``view(self.bias_shape)``): the width read there is that module's to rewrite. A width
        the method was handed (``x.view(b, t, heads, -1)``) came from its caller's code."""
        if frame is None or not frame.f_code.co_argcount:
            return None
        me = frame.f_code.co_varnames[0]
        first = frame.f_locals.get(me)
        if not isinstance(first, nn.Module) or first not in self.names:
            return None
        if first is self.running[-1] or f"{me}." not in source:
            return None
        return first

    def note_width(
        self,
        value: int,
        layout: Layout,
        context: tuple | None = None,
        at: tuple[int, int] | None = None,
        sizes: tuple[int, ...] = (),
        entry: int = -1,
    ) -> None:
        """Note that ``value`` was read as the width of ``layout``; ``at`` is ``(axis, ndim)``
        when it was entry ``axis`` of a shape of ``ndim`` entries; ``sizes`` and ``entry`` when
        it was entry ``entry`` of a split's sizes or of a shape given whole."""
        if (context := context or self.note_context()) is not None:
            module_name, names, source, passed, (own_source, code) = context
            shaped = shape_locals(code) if code is not None else {}
            spelled_at = names_at(source, *at) if at is not None and not passed else None
            read_at = names_at(own_source, *at) if at is not None else None
            from_shape = bool(read_at) and read_at <= shaped.keys()  # type: ignore[operator]
            # M2M100's ``view(bsz, seq_len, self.weights.shape[-1])``
            from_shape = from_shape or (at is not None and shape_read_at(own_source, *at))
            spelled = spelled_names(source)
            note = WidthNote(
                module_name,
                int(value),
                layout,
                names,
                spelled,
                spelled_at,
                passed,
                from_shape,
                sizes,
                entry,
            )
            self.notes.append(note)
            local = bare_name_at(own_source, *at) if at is not None else None
            if local in shaped and code is not None:
                self.tie_to_shape_read(code, shaped[local], int(value), layout)

    def note_literals(
        self, args: tuple, axis: int, value: int, layout: Layout, context: tuple | None = None
    ) -> None:
        """Note ``value`` when the reshape's shape argument spells it at ``axis`` (not -1)."""
        shape = [v for v in tree_flatten(list(args[1:]))[0] if not isinstance(v, torch.Tensor)]
        if len(shape) > axis and isinstance(shape[axis], int) and shape[axis] == value:
            # a shape given whole (timm's ``view(self.bias_shape)``): an attribute may hold it
            given = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else ()
            whole = tuple(given) if given and all(type(v) is int for v in given) else ()
            entry = axis if whole else -1
            self.note_width(value, layout, context, at=(axis, len(shape)), sizes=whole, entry=entry)

    # -- torch calls -------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = _name(func)
        if self.meta and name in _SHAPE_KEEPING and args and isinstance(args[0], torch.Tensor):
            # meta kernels of norms and activations decompose slowly in Python; the shape is known
            inplace = name.endswith("_") or kwargs.get("inplace") or args[-1] is True
            out = args[0] if inplace else torch.empty_like(args[0])
        else:
            out = func(*args, **kwargs)
        if self.depth == 0:
            if name in ("__get__", "size") and args and isinstance(args[0], torch.Tensor):
                self.shape_read(args[0])
            self.record(name, args, kwargs, out)
        elif name in STANDARDISING and self.running and not self.tracked([args[:1]]):
            self.standardising.add(id(self.running[-1]))  # StdConv2d's batch_norm on its weight
        return out

    def shape_read(self, t: torch.Tensor) -> None:
        """Remember which channels a shape was read from, by where the code read it (its
        frame's code and instruction): a reshape spelling that width later ties to them."""
        info = self.layouts.get(id(t))
        frame = calling_frame()
        if info is not None and frame is not None:
            key = (id(frame.f_code), frame.f_lasti)
            self.shape_reads[key] = (info[0], info[1], t.dim(), t.shape[info[1]])

    def tie_to_shape_read(
        self, code: Any, read: tuple[int, int | None], value: int, layout: Layout
    ) -> None:
        """A reshape spells, at its channel axis, a local the code read from the shape of
        other channels (timm's BEiT, Swin-V2 and PVT-v2, torchvision's Swin: ``B, N, C =
        x.shape`` ... ``reshape(B, N, C)``): after pruning the two widths must still be equal,
        so the two spaces become one (the coarser unit wins: whole heads and as many hidden
        channels). ``read`` is where that local was read and which entry it took."""
        offset, entry = read
        found = self.shape_reads.get((id(code), offset))
        if found is None or entry is None:
            return
        earlier, axis, ndim, width = found
        if entry % ndim == axis and width == value and earlier != layout:
            same = self.table.unit_widths(earlier)
            if same is None or same != self.table.unit_widths(layout):
                self.unify(earlier, layout)  # else the same channels in another order

    def follow_param(self, name: str, args: tuple, out: Any, kwargs: dict | None = None) -> None:
        if name in CAT and args and isinstance(out, torch.Tensor):
            pieces = args[0]
            axis = int(dim_arg(args, kwargs or {}, 1, 0)) % out.dim()
            if (
                isinstance(pieces, (list, tuple))
                and pieces
                and all(
                    isinstance(p, torch.Tensor) and id(p) in self.params and p.dim() == out.dim()
                    for p in pieces
                )
            ):
                self.param_cats[id(out)] = (axis, tuple(pieces))
                self.keepalive.append(out)
            return
        if (leaves := self.param_mix(name, args, out)) is not None:
            self.param_mixes[id(out)] = leaves
            self.keepalive.append(out)
            return
        src = args[0] if args else None
        if isinstance(src, torch.Tensor) and id(src) in self.param_mixes:
            self.follow_mix(name, args, out, kwargs)
            return
        entry = self.params.get(id(src)) if isinstance(src, torch.Tensor) else None
        if entry is None or not isinstance(out, torch.Tensor):
            return
        factors = self.param_factors.get(id(src), (1,) * src.dim())
        if name in PARAM_PASS or scalar_arithmetic(name, args, out):
            dims = entry[2]
        elif name in ("transpose", "swapaxes") and len(args) == 3:
            a, b = (int(v) % src.dim() for v in args[1:3])
            order = list(range(src.dim()))
            order[a], order[b] = order[b], order[a]
            dims, factors = tuple(entry[2][i] for i in order), tuple(factors[i] for i in order)
        elif name == "permute":
            order = permute_order(src.dim(), name, args, kwargs or {})
            if order is None or len(order) != src.dim():
                return
            dims, factors = tuple(entry[2][i] for i in order), tuple(factors[i] for i in order)
        elif name in PARAM_SHAPE:
            dims, factors = reshaped_dims(src.shape, out.shape, entry[2], factors)
        elif any(f > 1 for f in factors):
            return  # the ops below know nothing of heads
        elif name == "index_select" and len(args) == 3 and isinstance(args[1], int):
            picked = args[1] % src.dim()  # rows picked along it: no channel axis any more
            dims = tuple(None if d == picked else pd for d, pd in enumerate(entry[2]))
            if (pd := entry[2][picked]) is not None:  # fixed indices: none of it may go
                self.param_indexed.add((entry[0], entry[1], pd))
        elif name == "__getitem__" and len(args) > 1 and single_number(args[1]):
            dims = entry[2][1:]  # one slice of a stacked parameter (an MoE expert's weight)
        elif name == "__getitem__" and len(args) > 1 and gathers_rows(args[1], src, out):
            dims = (None, *entry[2][1:])  # stack[ids]: one expert's matrix per token row
        elif name == "__getitem__" and len(args) > 1 and index_axes(src.shape, args[1]):
            dims = indexed_dims(src.shape, args[1], entry[2], out.dim())
        else:
            return
        self.keepalive.append(out)
        self.params[id(out)] = (entry[0], entry[1], dims)
        if name in ("view", "reshape") and (context := self.note_context()) is not None:
            # a width spelled in the view of a parameter (timm's layer scale,
            # ``scale.view(self.shape)``) is noted once the parameter meets its channels,
            # maybe after a permute (timm's ``view(self.bias_shape).permute(2, 0, 1)``)
            self.param_views[id(out)] = (args, context, dims)
        elif (view := self.param_views.get(id(src))) is not None:
            self.param_views[id(out)] = view
        if len(factors) == out.dim() and any(f > 1 for f in factors):
            self.param_factors[id(out)] = factors

    def uniform_operand(self, t: torch.Tensor, at: int, layout: Layout) -> bool:
        """An untracked operand with a value per unit of ``layout`` along axis ``at`` that is
        the same for every unit (T5's cross-attention position bias, ``torch.zeros((1,
        self.n_heads, q, k))`` plus a mask that broadcasts over the heads, added to the scores
        or passed to sdpa) loses the units ``layout`` loses, once the width it was made with
        is noted where it was made; every op it reaches (T5 reuses it in each decoder layer)
        keeps as many units, the same ones."""
        made = self.uniform.along(t, at)
        if made is None or made.context is None:
            return False
        axis = at - t.dim() + made.ndim
        if (reader := self.uniform_read.get((made.serial, axis))) is not None:
            # another op read its width: it keeps it, and so do the units met with it
            self.table.block_layout(
                layout, f"a tensor made with their count is also read by '{reader}'"
            )
            return True
        if (earlier := self.uniform_layouts.get((made.serial, axis))) is not None:
            if self.unify(earlier, layout) is None:
                return False
        else:
            noted = len(self.notes)
            if axis >= 0:
                self.note_literals((None, *made.args), axis, t.shape[at], layout, made.context)
            if len(self.notes) == noted:
                return False  # no width spelled where it was made: it could not follow
            self.uniform_layouts[(made.serial, axis)] = layout
        self.uniform_used.add((id(t), at % t.dim()))
        return True

    def read_uniform(self, name: str, marked: list, out: Any) -> None:
        """After op ``name``: each axis of a uniform tensor among its operands (``marked``,
        with their marks from before the op) that the op neither carried into ``out`` nor
        took as units of a layout was read by its width (``(zeros + 1).sum(1)``). Such an
        axis keeps its width: a layout that already took it is blocked, and none takes it
        after."""
        for t, marks in marked:
            for k, made in marks.items():
                if (id(t), t.dim() + k) in self.uniform_used or self.uniform.carried(out, k, made):
                    continue
                key = (made.serial, made.ndim + k)
                self.uniform_read.setdefault(key, name)
                if (layout := self.uniform_layouts.pop(key, None)) is not None:
                    reason = f"a tensor made with their count is also read by '{name}'"
                    self.table.block_layout(layout, reason)

    def pick(self, layout: Layout, out: torch.Tensor) -> bool:
        """``x[..., i, ...]`` at the channel axis: one channel's values, with no channel axis.
        Dropping channels moves which one that is, so any later read of its values (not of
        its shape) blocks them."""
        self.picked[id(out)] = layout
        self.keepalive.append(out)
        return True

    def read_picked(self, values: Any, how: str) -> None:
        """Block the channels of every picked tensor among ``values``: ``how`` read them. A
        picked unit that is a block of a view of the last axis asks for that view to be
        folded on the next trace."""
        for v in tree_flatten(list(values))[0]:
            if isinstance(v, torch.Tensor) and id(v) in self.picked:
                layout = self.picked[id(v)]
                roots = {self.table.find(seg.space) for seg in layout}
                self.folds_wanted.update(
                    site for space, site in self.split_sites if self.table.find(space) in roots
                )
                self.table.block_layout(layout, f"one channel's values {how}")

    def note_split_site(self, coarse: Layout) -> None:
        """Remember where a view of the last axis into (blocks, per block) made ``coarse``."""
        if (frame := calling_frame()) is not None:
            site = (frame.f_code, frame.f_lasti)
            self.split_sites += [(seg.space, site) for seg in coarse]

    def folded_split(self, layout: Layout, blocks: int, out: torch.Tensor, axis: int) -> bool:
        """A view of the last axis into (blocks, per block) at a site to fold: unit k of the
        channels is entry k of every block, on the inner ``axis``, and the blocks axis is
        like a batch axis (each of Gemma's layers picks its own block of the per-layer
        embeddings, which one RMSNorm weight scales alike). Folded only where an earlier trace
        saw a block picked and its values read, which had kept the channels whole."""
        frame = calling_frame()
        if frame is None or (frame.f_code, frame.f_lasti) not in self.folds:
            return False
        if len(layout) != 1 or layout[0].factor != 1 or blocks < 2:
            return False
        self.set(out, (Segment(self.table.interleave(layout[0].space, blocks)),), axis)
        return True

    def record(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Apply the rule of op ``name`` to what it read and made."""
        # a property that gives a tensor (``.mT``, ``.data``) reads it too; ``.shape`` does not
        values = name not in _IGNORED or (name == "__get__" and isinstance(out, torch.Tensor))
        values = values and name not in _NEW_FROM  # ``x.new_ones(...)``: only x's dtype
        marked = self.uniform.marks_in([args, kwargs]) if values else []
        self.uniform_used = set()
        into = written(name, args, kwargs)
        if values and self.stale:
            self.read_stale(name, [args, kwargs], {id(t) for t in into})
        # destinations without channels, and their other views (slices, and aliases such as
        # ``.detach()`` of a uniform tensor): a write may give them channels
        blank = []
        for t in into:
            if not self.known(dst := self.destination(t)):
                key = storage_key(dst)
                views = [*self.views_by_storage.get(key, ()), *self.uniform.on(key)]
                blank.append((dst, [v for v in views if v is not t and v is not dst]))
        self._record(name, args, kwargs, out)
        aliasing = out is not args[0] if name in ("detach", "__get__") and args else False
        view = isinstance(out, torch.Tensor) and (out._base is not None or aliasing)
        if view and not self.known(out):
            # a view without channels (``buf[0][None]``, ``.view``, ``.detach()``): a later
            # write into its memory may give them
            self.views_by_storage.setdefault(storage_key(out), []).append(out)
            self.keepalive.append(out)
        for dst, views in blank:
            if self.known(dst):  # it did: views taken before now show them
                self.stale.update({id(v): dst for v in views})
        if name in FILLED and (made := self.uniform.marks_in([out])):
            self.filled[id(out)] = made[0][1]  # what made it, kept past writes into it
        if marked:  # what the op writes into is not read by its width
            targets = {id(t) for t in into}
            self.read_uniform(name, [(t, m) for t, m in marked if id(t) not in targets], out)

    def destination(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor a write into ``t`` fills: the one ``t`` is a slice view of, or ``t``."""
        view = self.slice_views.get(id(t))
        return view[0] if view is not None else t

    def read_stale(self, name: str, values: Any, targets: set[int]) -> None:
        """Block the channels of each tensor a stale view among ``values`` (not written by
        the op) shows: which channel sits where in it moves with pruning, and the trace gave
        the view none of them."""
        reason = f"a view taken before their values were written is read by '{name}'"
        for v in tree_flatten(values)[0]:
            stale = isinstance(v, torch.Tensor) and id(v) in self.stale and id(v) not in targets
            if stale and (info := self.info(self.stale[id(v)])) is not None:
                self.table.block_layout(info[0], reason)

    def _record(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        picked = first is not None and id(first) in self.picked
        if picked and name == "__get__" and isinstance(out, torch.Tensor):
            self.picked[id(out)] = self.picked[id(first)]  # ``.mT``, ``.data``: the same values
            self.keepalive.append(out)
            return
        if name in _IGNORED:
            return
        self.copies.follow(name, args, kwargs, out)
        if (
            name == "__getitem__"
            and first is not None
            and isinstance(out, torch.Tensor)
            and basic_selectors(first.shape, args[1]) is not None  # a view: writes reach first
        ):
            self.slice_views[id(out)] = (first, args[1])
            self.keepalive.append(out)
        if self.picked:
            self.read_picked([args, kwargs], f"are read by '{name}'")
        if name == "copy_" and first is not None and id(first) not in self.params:
            # into a slice of another tensor, or into all of this one (a cache's state); a
            # view made another way is no destination the trace can follow
            value = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("src"))
            target = self.slice_views.get(id(first))
            if target is None and first._base is None:
                target = (first, Ellipsis)
            self.uniform.forget([first])
            self.write_slice(*(target or (None, None)), first, value)
            return
        if name == "__setitem__" and first is not None and len(args) == 3:
            self.uniform.forget([first])
            self.setitem(*args)
            return
        context = self.note_context
        if name in _FRESH and isinstance(out, torch.Tensor):  # a destination writes may fill
            made_at = self.note_context()
            self.fresh_made[id(out)] = (made_sizes(name, args, kwargs), made_at)
            self.keepalive.append(out)
            context = lambda: made_at  # noqa: E731 - read once, for the uniform tracker too
        inputs = self.tracked([args, kwargs])
        gathered = name == "__getitem__" and param_gather(self.params, args, inputs)
        if gathered or param_index_select(self.params, name, args, inputs):
            for t in inputs:  # index values computed from channels: those channels stay
                self.table.block_layout(self.info(t)[0], f"their values pick rows of {name}")
            gathered = True
        if not inputs or gathered:
            self.uniform.follow(name, args, kwargs, out, context)
            self.follow_param(name, args, out, kwargs)
            return
        self.uniform.forget(written(name, args, kwargs))
        x = inputs[0]
        if id(x) in self.deferred and self.select_deferred(x, name, args, kwargs, out):
            return
        layout, dim = self.info(x)  # type: ignore[misc]
        single = bool(args) and args[0] is x and (len(inputs) == 1 or name in _LIKE)
        tensor_out = isinstance(out, torch.Tensor)
        rules = (
            (
                name in POINTWISE and single and tensor_out,
                lambda: self.pointwise(x, layout, dim, out),
            ),
            (
                name in SOFTMAX and single,
                lambda: self.softmax(x, name, args, kwargs, layout, dim, out),
            ),
            (name in ELEMENTWISE and tensor_out, lambda: self.elementwise(args, out, kwargs)),
            (name in RESHAPE and single, lambda: self.reshape(x, layout, dim, out, name, args)),
            (
                name in PERMUTE and single,
                lambda: self.permute(x, name, args, kwargs, layout, dim, out),
            ),
            (
                name in REDUCE and single,
                lambda: self.reduce(x, name, args, kwargs, layout, dim, out),
            ),
            (name in CAT, lambda: self.cat(args, kwargs, out)),
            (name == "stack" and tensor_out, lambda: self.stacked(args, kwargs, out)),
            (name in _LIKE_NEW and single, lambda: self.fresh_like(x, dim, out)),
            (  # x.new_tensor(data): data's values, none of x's channels
                name == "new_tensor" and not self.tracked([args[1:], kwargs]),
                lambda: True,
            ),
            (
                name in _NEW_FROM and single and tensor_out,
                lambda: self.new_from(x, dim, name, args, kwargs, out, context),
            ),
            (name in ("index_add", "index_add_"), lambda: self.index_add(args, kwargs, out)),
            (
                name in GROUPED_MM and args[0] is x,
                lambda: self.grouped_mm(args, x, layout, dim, out),
            ),
            (
                name in ("view_as", "reshape_as") and single,
                lambda: self.reshape(x, layout, dim, out, name, args),
            ),
            (
                name in SPLIT and single,
                lambda: self.narrow_split(x, name, args, kwargs, layout, dim, out),
            ),
            (
                name == "__getitem__" and (single or indexed_by_numbers(x, args, inputs)),
                lambda: self.getitem(x, args, layout, dim, out),
            ),
            (name == "bmm", lambda: self.gathered_bmm(args, x, layout, dim, out)),
            (name in MATMUL, lambda: self.matmul(args, out)),
            (name == "scaled_dot_product_attention", lambda: self.attention(args, kwargs, out)),
            (name == "einsum", lambda: self.einsum(args, out)),
            (
                name == "linalg_solve_triangular",
                lambda: self.solve_triangular(args, kwargs, out),
            ),
            (name in NORM_FN and single, lambda: self.norm_fn(args, kwargs, x, layout, dim, out)),
            (
                name in CONV_FN and args[0] is x and tensor_out,
                lambda: self.depthwise_fn(args, kwargs, x, layout, dim, out),
            ),
            (
                name in LINEAR_FN and single,
                lambda: self.linear_fn(args, kwargs, x, layout, dim, out),
            ),
            (name == "expand_as" and single, lambda: self.pointwise(x, layout, dim, out)),
            (  # a triangle of each matrix on the last two axes: channels elsewhere pass
                name in ("tril", "triu", "tril_", "triu_") and single and dim < x.dim() - 2,
                lambda: self.pointwise(x, layout, dim, out),
            ),
            (
                name in ("view_as_complex", "view_as_real") and single and tensor_out,
                lambda: self.complex_view(x, layout, dim, out),
            ),
            (  # torchvision's roi_align(features, boxes): boxes pick rows, channels pass
                name == "roi_align" and args[0] is x and dim == 1 and tensor_out,
                lambda: self.pointwise(x, layout, dim, out),
            ),
            (
                name == "gather" and single and tensor_out,
                lambda: self.gather(x, args, kwargs, layout, dim, out),
            ),
            (
                name == "repeat" and single and tensor_out,
                lambda: self.tile(x, args, kwargs, layout, dim, out),
            ),
            (
                name == "repeat_interleave" and single,
                lambda: self.repeat_interleave(x, args, kwargs, layout, dim, out),
            ),
        )
        for applies, rule in rules:
            if applies and rule():
                return
        self.block_all(inputs, out, f"op '{name}' has no channel rule")

    # -- modules -----------------------------------------------------------------------------
    def enter(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(self.names[module])
        self.running.append(module)

    def leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.stack.pop()
        self.running.pop()

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def post_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.depth -= 1
        if self.depth:
            return
        name = self.names[module]
        if self.picked and not isinstance(module, nn.Embedding):  # a float input to an
            self.read_picked(args, f"are read by {name}")  # Embedding gives only its shape
        x = args[0] if args else None
        info = self.info(x) or self.parameter_source(module, x)
        if name in self.called:
            if self.called_again(module, name, x, info, out):
                return
            # other modules used twice would need their spaces kept equal; refuse, not guess
            self.block_all([x] if info else [], out, f"module {name} is called more than once")
            for seg_space in self.called[name]:
                self.table.block(seg_space, f"module {name} is called more than once")
            return
        if isinstance(module, nn.Embedding) and isinstance(out, torch.Tensor):
            self.fresh(out, -1)
            self.table.add_member(self.layouts[id(out)][0], name, "embedding")
            self.called[name] = [s.space for s in self.layouts[id(out)][0]]
            self.layer_calls[name] = (None, self.layouts[id(out)][0], -1)
            return
        if isinstance(module, nn.MultiheadAttention) and info is not None:
            if x.dim() > 1 and info[1] != x.dim() - 1 and self._all_blocked(info[0]):
                # a fixed input (a 3-D model input is tracked on axis 1, as images are): its
                # features are fixed too, and the heads inside may still go
                info = ((Segment(self.table.new(x.shape[-1], blocked="fixed input")),), x.dim() - 1)
            self.called[name] = [s.space for s in info[0]]
            if not self.multihead(module, name, args, info, out):
                self.block_all(
                    [t for t in args if self.info(t)], out, f"attention {name} unsupported"
                )
            return
        if not isinstance(out, torch.Tensor):
            if isinstance(module, nn.Linear) and info is not None and info[1] == x.dim() - 1:
                # a Linear that returns more than its output (PhiMoE's router: its logits with
                # the experts they pick) reads the channels; what it writes stays whole
                self.table.add_member(info[0], name, "linear_in")
                self.called[name] = [s.space for s in info[0]]
                self.block_all([], out, f"{name} returns more than one tensor")
            return
        if info is None or (
            all(self.table.find(s.space) in self.table.blocked for s in info[0])
            and not self.leaf_reads(module, x, info[1])
        ):  # the input is fixed (a model input, say); the outputs may still be prunable
            if not self.origin(module, name, out):
                self.fresh(out, 1 if out.dim() > 2 else -1, blocked=f"{name} reads untracked input")
            return
        layout, dim = info
        self.called[name] = [s.space for s in layout]
        if (isinstance(module, nn.Linear) or is_hf_conv1d(module)) and not self.leaf_reads(
            module, x, dim
        ):
            if self.per_channel(layout) and out.dim() == x.dim():
                # it mixes another axis of each channel on its own (MLP-Mixer's and ResMLP's
                # token mixing, on the transposed tokens): the channels pass through. A bias
                # gives a silent channel values again, so removing one is not exact (as under
                # a norm): the group is then of the "hidden" kind
                if getattr(module, "bias", None) is not None:
                    for seg in layout:
                        self.table.flag(seg.space, "pooled")
                self.set(out, layout, dim)
                return
            # the channels reach it along another axis than the one it reads, in whole heads
            # whose features it reads (Bloom's attention output, its heads merged into the
            # batch axis): they stay whole; it writes a new space
            self.table.block_layout(layout, f"{name} reads them along another axis")
            self.origin(module, name, out)
            return
        if self.norm_beside(module, x, dim, out):
            self.set(out, layout, dim)
            return
        if not self.leaf(module, name, x, layout, dim, out):
            self.block_all([x], out, f"{type(module).__name__} {name} is not supported here")

    @staticmethod
    def norm_beside(module: nn.Module, x: torch.Tensor, dim: int, out: Any) -> bool:
        """A LayerNorm or RMSNorm over the last axis while the channels lie along another
        (Persimmon's q_layernorm over each head's dims, heads being the units): it normalizes
        each channel's entries on their own, its weight shared by all of them, so the channels
        pass through and its weight stays whole."""
        return (
            isinstance(module, (nn.LayerNorm, nn.RMSNorm))
            and len(module.normalized_shape) == 1
            and dim < x.dim() - 1
            and isinstance(out, torch.Tensor)
            and out.shape == x.shape
        )

    def per_channel(self, layout: Layout) -> bool:
        """Whether each unit of ``layout`` is one entry of its axis, not a head whose features
        lie along other axes."""
        coarse = {self.table.find(space) for space, _ in self.table.coarse.values()}
        return all(s.factor == 1 and self.table.find(s.space) not in coarse for s in layout)

    def leaf_reads(self, module: nn.Module, x: torch.Tensor, dim: int) -> bool:
        """Whether a producer layer reads its channels along ``dim`` of ``x``."""
        if isinstance(module, nn.Linear) or is_hf_conv1d(module):
            return dim == x.dim() - 1
        return not isinstance(module, nn.modules.conv._ConvNd) or dim == 1

    def origin(self, module: nn.Module, name: str, out: torch.Tensor) -> bool:
        """A Linear/conv whose input is fixed still writes a fresh, prunable space."""
        if isinstance(module, nn.Linear) or is_hf_conv1d(module):
            role, dim = ("linear_out" if isinstance(module, nn.Linear) else "conv1d_out"), -1
        elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
            convt = isinstance(module, nn.modules.conv._ConvTransposeNd)
            role, dim = ("convT_out" if convt else "conv_out"), 1
        else:
            return False
        self.fresh(out, dim)
        self.table.add_member(self.layouts[id(out)][0], name, role)
        self.called.setdefault(name, []).extend(s.space for s in self.layouts[id(out)][0])
        self.layer_calls[name] = (None, self.layouts[id(out)][0], dim)
        if role == "conv_out":
            self.filter_extras(module, name, None, out)
        return True

    def filter_extras(self, module: nn.Module, name: str, reads: Layout | None, out) -> None:  # noqa: ANN001
        """A conv subclass's per-filter tensors and weight standardisation (NFNet, BiT)."""
        if type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            standardised = id(module) in self.standardising
            writes = self.layouts[id(out)][0]
            per_group = name in self.per_group
            add_filter_extras(self.table, module, name, reads, writes, standardised, per_group)

    def parameter_source(self, module: nn.Module, x: Any) -> tuple[Layout, int] | None:
        """A float parameter fed to a Linear or a norm over its last axis (DeBERTa's relative
        position embeddings, ``rel_embeddings.weight``, normalised and projected): that axis is
        a source of channels, whose slices of the parameter follow them. Not integer buffers
        (position ids into an Embedding), nor convolutions (a learned constant image)."""
        reads_last = isinstance(module, (nn.Linear, nn.LayerNorm, nn.RMSNorm)) or is_hf_conv1d(
            module
        )
        if not reads_last or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        entry = self.params.get(id(x))
        if entry is None or x.dim() < 2 or entry[2][-1] is None or id(x) in self.param_factors:
            return None
        module_name, pname, dims = entry
        key = (module_name, pname, dims[-1])
        if key in self.param_outputs:  # the same parameter fed again (one slice per layer)
            self.set(x, (Segment(self.table.find(self.param_outputs[key])),), -1)
            return self.info(x)
        self.fresh(x, -1)
        layout = self.layouts[id(x)][0]
        self.table.add_member(layout, module_name, "param_out", tensor=pname, dim=dims[-1])
        self.param_outputs[key] = layout[0].space
        return self.info(x)

    def called_again(self, module, name, x, info, out) -> bool:  # noqa: ANN001
        """A layer called once more (DeBERTa's ``query_proj`` on the hidden states and on the
        relative position embeddings; ALBERT's one layer run at every depth): its weights are
        shared across calls, so the input channels of every call are one space, and so are the
        outputs (a norm's output is its input). An input that is fixed in one call and not in
        another leaves the other whole."""
        first = self.layer_calls.get(name)
        if first is None or not isinstance(out, torch.Tensor):
            return False
        first_in, first_out, dim = first
        fixed = info is None or (
            all(self.table.find(s.space) in self.table.blocked for s in info[0])
            and not self.leaf_reads(module, x, info[1])
        )
        norm = first_in is first_out  # its output is its input's channels
        if not fixed and not _reads_channels_at(module, x, info[1]):
            return False
        reason = f"module {name} also reads a fixed input"
        if norm:
            if fixed or (joined := self.unify(first_in, info[0])) is None:
                return False  # blocked whole by the caller
            self.set(out, joined, info[1])
            return True
        if fixed:
            if first_in is not None:
                self.table.block_layout(first_in, reason)
            if info is not None:
                self.table.block_layout(info[0], reason)
        elif first_in is None:
            self.table.block_layout(info[0], reason)
        elif self.unify(first_in, info[0]) is None:
            return False
        self.set(out, first_out, dim)
        return True

    def leaf(self, module, name, x, layout, dim, out) -> bool:  # noqa: ANN001
        last = dim == x.dim() - 1
        if isinstance(module, nn.Linear) or is_hf_conv1d(module):
            if not last:
                return False
            kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
            return self.producer(name, layout, out, f"{kind}_in", f"{kind}_out", -1)
        if isinstance(module, nn.modules.conv._ConvNd):
            if dim != 1:
                return self.conv_along_channels(module, x, layout, dim, out)
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                return module.groups == 1 and self.producer(
                    name, layout, out, "convT_in", "convT_out", 1
                )
            if module.groups == 1:
                done = self.producer(name, layout, out, "conv_in", "conv_out", 1)
            else:
                done = self.grouped_conv(module, name, layout, out)
            if done:
                self.filter_extras(module, name, layout, out)
            return done
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return dim == 1 and self.passthrough(name, layout, out, dim, "norm")
        if type(module) in (nn.LayerNorm, nn.RMSNorm):
            if not last or len(module.normalized_shape) != 1:
                return False
            for seg in layout:
                self.table.flag(seg.space, "pooled")
            return self.passthrough(name, layout, out, dim, "layernorm")
        if isinstance(module, nn.GroupNorm):
            if dim != 1 or len(layout) != 1 or layout[0].factor != 1:
                return False
            per_group = module.num_channels // module.num_groups
            strided = self.table.strided.get(self.table.find(layout[0].space))
            if strided is not None and strided[1] % module.num_groups == 0:
                # after a grouped conv that shrinks every group alike: so does each of its
                # groups (each spans whole conv groups), and its statistics move
                self.table.flag(layout[0].space, "pooled")
            elif 1 < module.num_groups < module.num_channels:  # whole groups go
                self.table.coarsen(layout[0].space, per_group)
            if module.num_groups == 1:  # statistics over all channels, as a LayerNorm's
                self.table.flag(layout[0].space, "pooled")
            return self.passthrough(name, layout, out, dim, "groupnorm")
        return False

    def multihead(self, module, name, args, info, out) -> bool:  # noqa: ANN001
        """``nn.MultiheadAttention`` with packed q/k/v weights: its input and output are hidden
        channels (``in_proj_weight`` columns, ``out_proj`` rows), and its inner width is a space
        of its own, one unit per head: the q, k and v rows of a head (offsets 0, inner and
        2 * inner of ``in_proj_weight`` and ``in_proj_bias``), its ``out_proj`` columns and its
        ``bias_k``/``bias_v`` entries. Surgery switches a pruned module to
        ``pruning.PrunedMultiheadAttention``, whose inner width is free of ``embed_dim``."""
        layout, dim = info
        q, k, v = (args + (None, None))[:3]
        if not module._qkv_same_embed_dim or dim != q.dim() - 1 or module.in_proj_weight is None:
            return False
        for t in (k, v):
            if t is not q and (self.info(t) is None or self.unify(layout, self.info(t)[0]) is None):
                return False
        self.table.add_member(layout, name, "param", tensor="in_proj_weight", dim=1)
        result = out[0] if isinstance(out, tuple) else out
        self.fresh(result, -1)
        out_layout = self.layouts[id(result)][0]
        self.table.add_member(out_layout, f"{name}.out_proj", "linear_out")
        self.called[name] += [s.space for s in out_layout]
        head_dim = module.head_dim
        inner = module.in_proj_weight.shape[0] // 3
        if head_dim < 1 or inner != module.num_heads * head_dim:
            return True  # widths this module cannot have: its heads stay as they are
        fine = self.table.new(inner)
        qkv = (Segment(fine),) * 3  # the same channels at offsets 0, inner and 2 * inner
        self.table.add_member(qkv, name, "param_out", tensor="in_proj_weight", dim=0)
        if module.in_proj_bias is not None:
            self.table.add_member(qkv, name, "param", tensor="in_proj_bias", dim=0)
        for tensor in ("bias_k", "bias_v"):
            if getattr(module, tensor, None) is not None:
                self.table.add_member((Segment(fine),), name, "param", tensor=tensor, dim=2)
        self.table.add_member((Segment(fine),), f"{name}.out_proj", "linear_in")
        self.table.flag(self.table.coarsen(fine, head_dim), "heads")
        self.called[name].append(fine)  # a second call blocks the heads too
        return True

    def conv_along_channels(self, module, x, layout, dim, out) -> bool:  # noqa: ANN001
        """A conv sliding along the channels as a spatial axis (ECA's Conv1d over the pooled
        channels, kernel 3): each output position is its channel again, mixed with its
        neighbours. The channels pass through; removing one changes its neighbours' mix, so
        they are of the ``pooled`` kind (removed, not exactly)."""
        if isinstance(module, nn.modules.conv._ConvTransposeNd) or dim < 2:
            return False
        if out.dim() != x.dim() or out.shape[dim] != x.shape[dim]:
            return False
        for seg in layout:
            self.table.flag(seg.space, "pooled")
        self.set(out, layout, dim)
        return True

    def producer(self, name, layout, out, consumer_role, producer_role, dim) -> bool:  # noqa: ANN001
        self.table.add_member(layout, name, consumer_role)
        self.fresh(out, dim)
        self.table.add_member(self.layouts[id(out)][0], name, producer_role)
        self.called[name] += [s.space for s in self.layouts[id(out)][0]]
        self.layer_calls[name] = (layout, self.layouts[id(out)][0], dim)
        return True

    def passthrough(self, name, layout, out, dim, role) -> bool:  # noqa: ANN001
        self.table.add_member(layout, name, role)
        self.set(out, layout, dim)
        self.layer_calls[name] = (layout, layout, dim)  # in and out: the same channels
        return True

    def grouped_conv(self, module, name, layout, out) -> bool:  # noqa: ANN001
        """Grouped conv. With at least two inputs and outputs per group
        (:func:`can_shrink_per_group`: ResNeXt, RegNet) every group loses the same channels:
        unit ``k`` of the input space is the ``k``-th input of each group, unit ``k`` of the
        output space the ``k``-th filter of each, and the two spaces stay independent (its
        MACs fall with both). Otherwise (a channel multiplier, or input channels already
        grouped in blocks) whole groups go, each taking its inputs and outputs along. A
        depthwise conv passes its channels through."""
        if any(seg.factor != 1 for seg in layout):
            return False
        g = module.groups
        if module.groups == module.in_channels == module.out_channels:
            # each channel on its own: a concat's parts pass through as they are (GhostNet)
            return self.passthrough(name, layout, out, 1, "depthwise")
        if len(layout) != 1:
            return False
        root = self.table.find(layout[0].space)
        per_group = can_shrink_per_group(module) and not (
            root in self.table.coarse or root in self.table.refined
        )
        kind = "pergroup" if per_group else "grouped"
        self.table.add_member(layout, name, f"{kind}_in")
        self.fresh(out, 1)
        out_layout = self.layouts[id(out)][0]
        self.table.add_member(out_layout, name, f"{kind}_out")
        self.called[name] += [out_layout[0].space]
        self.layer_calls[name] = (layout, out_layout, 1)
        if per_group:
            self.per_group.add(name)
            self.table.interleave(layout[0].space, g)
            self.table.interleave(out_layout[0].space, g)
            return True
        coarse_in = self.table.coarsen(layout[0].space, module.in_channels // g)
        coarse_out = self.table.coarsen(out_layout[0].space, module.out_channels // g)
        self.table.unite(coarse_in, coarse_out)
        return True


def _reads_channels_at(module: nn.Module, x: torch.Tensor, dim: int) -> bool:
    """Whether a layer of the kinds the trace reads (``leaf``) takes its channels on ``dim``."""
    last = dim == x.dim() - 1
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return last
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return last and len(module.normalized_shape) == 1
    return (
        isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        and dim == 1
    )


def _is_leaf(module: nn.Module) -> bool:
    return (
        isinstance(
            module,
            (
                nn.Linear,
                nn.modules.conv._ConvNd,
                nn.modules.batchnorm._BatchNorm,
                nn.Embedding,
                nn.GroupNorm,
            ),
        )
        or type(module) in (nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention)
        or getattr(type(module), "_secateur_leaf", False)  # pruning.PrunedMultiheadAttention
        or is_hf_conv1d(module)
    )


def trace(model: nn.Module, example_inputs: Any) -> Trace:
    """Run ``model`` once on ``example_inputs`` and record its channel spaces.

    ``example_inputs`` is a tensor, a sequence of positional tensors, or a dict of keyword
    tensors (HF style). Floating-point inputs and the model's outputs (see
    :func:`result_tensors`) are blocked (their widths are fixed by the data and the task);
    integer inputs (token ids) are not channels.
    """
    args, kwargs = split_inputs(example_inputs)
    try:  # shapes alone decide the graph: tracing on meta tensors skips all arithmetic
        traced = _trace_once(model, args, kwargs, meta=True)
        meta = True
    except Exception:  # data-dependent code (masks, .item()) needs real values
        traced = _trace_once(model, args, kwargs, meta=False)
        meta = False
    if traced.folds_wanted:  # views whose blocks were picked one by one: fold them, again
        with contextlib.suppress(Exception):  # the first trace stands: it kept them whole
            traced = _trace_once(model, args, kwargs, meta=meta, folds=traced.folds_wanted)
    if not meta:
        traced.output_shapes = _data_sized_axes(model, args, kwargs, traced.output_shapes)
    return traced


def _data_sized_axes(
    model: nn.Module, args: tuple, kwargs: dict, shapes: tuple[tuple[int, ...], ...]
) -> OutputShapes:
    """``shapes`` with ``None`` at each axis whose size follows the input's values (a
    detector's number of boxes): found by running the model once more on the example inputs'
    floating-point values shuffled. ``None`` when even the outputs' number or ranks change."""
    gen = torch.Generator().manual_seed(0)

    def shuffled(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.numel() < 2:
            return v
        order = torch.randperm(v.numel(), generator=gen).to(v.device)
        return v.flatten()[order].view_as(v)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            again = output_shapes(model(*tree_map(shuffled, args), **tree_map(shuffled, kwargs)))
    except Exception:  # the values broke it: the traced shapes stay as they are
        return shapes
    finally:
        model.train(was_training)
    if len(again) != len(shapes) or any(
        len(a) != len(b) for a, b in zip(again, shapes, strict=True)
    ):
        return None
    return tuple(
        tuple(x if x == y else None for x, y in zip(a, b, strict=True))
        for a, b in zip(shapes, again, strict=True)
    )


def _trace_once(
    model: nn.Module, args: tuple, kwargs: dict, *, meta: bool, folds: frozenset = frozenset()
) -> Trace:
    state: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    if meta:
        named = [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        for name, t in named:
            state[name] = copies.setdefault(id(t), t.detach().to("meta"))
        args, kwargs = tree_map(_to_meta, (args, kwargs))
    tracer = _Tracer(model, state, folds)
    for t in tree_flatten([args, kwargs])[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
            tracer.fresh(t, 1 if t.dim() > 2 else -1, blocked="model input")
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(tracer.enter))
        handles.append(m.register_forward_hook(tracer.leave, always_call=True))
        if _is_leaf(m):
            handles.append(m.register_forward_pre_hook(tracer.pre_hook))
            handles.append(m.register_forward_hook(tracer.post_hook))
    was_training = model.training
    model.eval()
    try:
        kept = _attributes_kept(model) if meta else contextlib.nullcontext()
        with torch.no_grad(), tracer, _on_meta(model, copies), kept:
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flat = result_tensors(out)
    tracer.read_picked(flat, "are a model output")
    for t in flat:
        info = tracer.info(t)
        if info is not None:
            tracer.table.block_layout(info[0], "model output")
    return Trace(
        tracer.table,
        tracer.notes,
        output_shapes(out),
        frozenset(tracer.param_indexed),
        frozenset(tracer.folds_wanted - folds),
    )


@contextlib.contextmanager
def _on_meta(model: nn.Module, copies: dict[int, torch.Tensor]) -> Iterator[None]:
    """Run with every parameter and buffer that has a meta copy swapped for it, each module
    once, and put the originals back. Not ``functional_call``: it swaps by path, and a module
    registered under two paths (CoaT's shared position encoders) got a meta tensor back."""
    swapped = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in copies:
                    swapped.append((store, name, t))
                    store[name] = copies[id(t)]
    try:
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put back every plain module attribute the run set, added or changed in place (one
    level of list or dict), and every buffer or submodule entry, so that tensors cached during
    a meta trace (torchvision's anchor generators move theirs to the input's device) never
    outlive it."""
    saved = []
    for module in model.modules():
        attrs = {k: v for k, v in vars(module).items() if k not in _MODULE_INTERNALS}
        contents = {
            k: list(v) if isinstance(v, list) else dict(v)
            for k, v in attrs.items()
            if type(v) in (list, dict)
        }
        for k in ("_buffers", "_modules"):  # a buffer registered as None, set in forward
            attrs[k] = getattr(module, k)
            contents[k] = dict(attrs[k])
        saved.append((module, attrs, contents))
    try:
        yield
    finally:
        for module, attrs, contents in saved:
            now = vars(module)
            for k in [k for k in now if k not in _MODULE_INTERNALS and k not in attrs]:
                del now[k]
            now.update(attrs)
            for k, items in contents.items():
                if isinstance(items, list):
                    attrs[k][:] = items
                else:
                    attrs[k].clear()
                    attrs[k].update(items)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def shapes_match(shapes: OutputShapes, expected: OutputShapes) -> bool:
    """Whether ``shapes`` are ``expected``, an axis of size ``None`` matching any size, and
    ``expected`` of ``None`` anything."""
    if expected is None:
        return True
    return len(shapes or ()) == len(expected) and all(
        len(a) == len(b) and all(y is None or x == y for x, y in zip(a, b, strict=True))
        for a, b in zip(shapes or (), expected, strict=True)
    )


# Fields of an HF seq2seq ``ModelOutput`` that carry inner states beside its logits (the
# encoder states, handed back to it by ``generate()``; the hidden states and attentions asked
# for): not what it outputs.
_INNER_STATES = frozenset(
    {
        "encoder_last_hidden_state",
        "encoder_hidden_states",
        "decoder_hidden_states",
        "hidden_states",
        "attentions",
        "encoder_attentions",
        "decoder_attentions",
        "cross_attentions",
    }
)


def result_tensors(out: Any) -> list[Any]:
    """Everything a model returned that its widths must keep: all of ``out`` flattened (an HF
    ``ModelOutput`` as its tuple), less the inner states of a seq2seq model's output (one
    with ``logits`` and ``encoder_last_hidden_state``)."""
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        keys = set(out.keys())
        seq2seq = {"logits", "encoder_last_hidden_state"} <= keys
        out = [out[k] for k in out if not (seq2seq and k in _INNER_STATES)]
    elif hasattr(out, "to_tuple"):
        out = list(out.to_tuple())
    return tree_flatten(out)[0]


def output_shapes(out: Any) -> tuple[tuple[int, ...], ...]:
    """Shapes of every tensor in a model's result (see :func:`result_tensors`)."""
    return tuple(tuple(t.shape) for t in result_tensors(out) if isinstance(t, torch.Tensor))
