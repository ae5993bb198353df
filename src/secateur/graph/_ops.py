"""Channel rules for torch calls: how each op maps the tracked feature axis of its inputs.

Every rule returns True when it recorded the output's layout, False when the op cannot be
followed with certainty (the tracer then blocks every space the op touched). A tensor has one
tracked axis; e.g. after ``view(B, T, H, D)`` of a projection it is the head axis ``H`` and the
within-head axis ``D`` is plain data, so whole heads are the units that can go.
"""

from __future__ import annotations

import math

import torch

from ._attention_rules import AttentionRules, DeferredView
from ._einsum import EinsumRule
from ._linalg_rules import LinalgRules
from ._shapes import (
    ShapeOnly,
    common_refinement,
    dim_arg,
    drop_ones,
    follow_axis,
    index_axes,
    intact_axis,
    merge_run,
    permute_order,
    regrouped_lead,
)
from ._shuffle_rules import GroupedView, ShuffleRules, grouped_split
from ._spaces import Layout, Segment
from ._write_rules import WriteRules


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# shape-preserving ops that act on each element alone (or on spatial positions only)
POINTWISE = _words(
    """
    abs adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d alpha_dropout avg_pool1d avg_pool2d avg_pool3d
    bfloat16 clamp clamp_ clamp_max clamp_min clamp_min_ clone contiguous cos detach double
    dropout dropout_ dropout1d dropout2d dropout3d elu elu_ erf exp feature_alpha_dropout float
    gelu gelu_ half hardsigmoid hardsigmoid_ hardswish hardswish_ hardtanh hardtanh_ interpolate
    leaky_relu leaky_relu_ pad log logsigmoid max_pool1d max_pool2d max_pool3d mish nan_to_num
    __neg__ neg pixel_unshuffle __pow__ pow reciprocal relu relu_ relu6 rsqrt selu sigmoid
    sigmoid_ sign silu silu_ sin softplus softsign sqrt square tanh tanh_ to type type_as upsample
    expm1 log1p log2 log10 exp2 erfc tan atan sinh cosh asinh floor ceil round trunc frac
    __abs__ __invert__ logical_not isnan isinf isfinite sgn signbit
    """
)
# broadcasting ops over several tensors
ELEMENTWISE = _words(
    """
    __add__ add add_ div div_ __iadd__ __imul__ __isub__ __itruediv__ lerp maximum minimum
    __mul__ mul mul_ __radd__ __rmul__ __rsub__ __rtruediv__ __sub__ sub sub_ __truediv__ where
    masked_fill masked_fill_ addcmul addcmul_ addcdiv addcdiv_
    __gt__ gt greater __lt__ lt less __ge__ ge greater_equal __le__ le less_equal __eq__ eq
    __ne__ ne not_equal logical_and logical_or logical_xor __and__ __or__ __xor__ fmin fmax
    """
)
RESHAPE = {
    "flatten",
    "view",
    "reshape",
    "unsqueeze",
    "squeeze",
    "unflatten",
    "expand",
    "broadcast_to",
}
NORMS = {"norm", "vector_norm", "linalg_vector_norm"}  # p-norms, called (x, ord, dim)
REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp", "max", "min"} | NORMS
CAT = {"cat", "concat", "concatenate"}
SPLIT = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
MATMUL = {"matmul", "__matmul__", "bmm"}
SOFTMAX = {"softmax", "log_softmax", "_softmax", "roll", "cumsum", "flip", "normalize"}
NORM_FN = {"layer_norm", "rms_norm"}
LINEAR_FN = {"linear"}
CONV_FN = {"conv1d", "conv2d", "conv3d"}
GROUPED_MM = {"grouped_mm", "_grouped_mm", "grouped_mm_fallback", "grouped_mm_fallback.default"}


def picks_rows(index: torch.Tensor) -> bool:
    """A 1-D integer tensor used as ``x[index]``: it picks whole rows of the first axis."""
    return index.dim() == 1 and not index.is_floating_point() and index.dtype != torch.bool


class OpRules(AttentionRules, EinsumRule, LinalgRules, ShuffleRules, WriteRules):
    """Mixin of op rules; the tracer provides ``table``, ``info``, ``set``, ``param_of``,
    ``add_param``, ``uniform_operand``, ``pick`` and ``note_width``."""

    # -- one input ---------------------------------------------------------------------------
    def pointwise(self, x, layout, dim, out) -> bool:  # noqa: ANN001
        if out.dim() == x.dim() and out.shape[dim] == x.shape[dim]:
            self.set(out, layout, dim)
            return True
        return False

    def complex_view(self, x, layout, dim, out) -> bool:  # noqa: ANN001
        """``view_as_complex`` makes each (real, imaginary) pair on the last axis one complex
        value, ``view_as_real`` the reverse; the other axes stay in place, and with them a
        channel axis (DeepSeek-V2 and Llama 4 rotate their heads as complex products). Channels
        on the pair's axis have no rule."""
        if dim >= min(x.dim(), out.dim()):
            return False
        self.set(out, layout, dim)
        return True

    def softmax(self, x, name, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        """Ops that mix values along given axes only (softmax, roll, cumsum, flip, normalize)."""
        if name == "normalize":  # F.normalize(x, p=2.0, dim=1)
            axes = dim_arg(args, kwargs, 2, 1)
        elif name == "roll":
            axes = kwargs.get("dims", args[2] if len(args) > 2 else None)
        elif name == "flip":
            axes = kwargs.get("dims", args[1] if len(args) > 1 else None)
        else:
            axes = dim_arg(args, kwargs, 1)
        if axes is None:
            return False
        axes = axes if isinstance(axes, (tuple, list)) else [axes]
        if any(int(a) % x.dim() == dim for a in axes):
            if name != "normalize":
                return False
            # a p-norm over the channels, as a LayerNorm's statistics: valid on fewer (SSD's
            # L2Norm), and a removed channel that was zero leaves it exact
            for seg in layout:
                self.table.flag(seg.space, "pooled")
        return self.pointwise(x, layout, dim, out)

    def reshape(self, x, layout, dim, out, name, args, tried=frozenset()) -> bool:  # noqa: ANN001
        """``tried``: the fallbacks below already applied on the way here (each once: dropping
        size-1 axes and regrouping leading axes would otherwise undo each other forever)."""
        if name in ("expand", "broadcast_to") and out.dim() >= x.dim():
            off = out.dim() - x.dim()
            if out.shape[dim + off] == x.shape[dim]:
                self.set(out, layout, dim + off)
                return True
            return False
        mapped = follow_axis(x.shape, out.shape, dim)
        if mapped is not None:
            self.set(out, layout, mapped)
        elif (run := merge_run(x.shape, out.shape)) is not None:
            self._merge(x, layout, dim, out, *run)
        elif (run := merge_run(out.shape, x.shape)) is not None:
            a, b = run
            if dim == a == x.dim() - 1 and b - a == 3 and name in ("view", "reshape", "unflatten"):
                if name == "unflatten":  # the sizes as a view's shape, for the widths they spell
                    args = (x, (0,) * a + tuple(args[2])) if len(args) > 2 else (x, ())
                args = tuple(tuple(v) if isinstance(v, list) else v for v in args)
                self.deferred[id(out)] = DeferredView(
                    tuple(x.shape), layout, a, tuple(out.shape), name, args, self.note_context()
                )
                self.keepalive.append(out)
                return True
            if name in ("view", "reshape") and grouped_split(x.shape, dim, out.shape):
                # (groups, per group): a channel shuffle if a transpose of the two reads it
                self.deferred[id(out)] = GroupedView(
                    tuple(x.shape), layout, dim, tuple(out.shape), name, args, self.note_context()
                )
                self.keepalive.append(out)
                return True
            if not self._split(x, layout, dim, out, *run):
                return False
        elif x.shape[dim] != 1 and (moved := intact_axis(x.shape, out.shape, dim)) is not None:
            self.set(out, layout, moved)  # other axes split or merged around the channels
        elif (
            name != "expand"
            and "drop" not in tried
            and (squeezed := drop_ones(x.shape, dim)) is not None
        ):
            # GPT-BigCode's view of (b, 1, t, heads * hd) as (b, t, heads, hd)
            shape, at = ShapeOnly(squeezed[0]), squeezed[1]
            return self.reshape(shape, layout, at, out, name, args, tried | {"drop"})
        elif (
            name != "expand"
            and "lead" not in tried
            and (lead := regrouped_lead(x.shape, out.shape, dim)) is not None
        ):
            # leading axes regrouped while the channels' run splits or merges (Twins' windows)
            shape, at = ShapeOnly(lead[0]), lead[1]
            return self.reshape(shape, layout, at, out, name, args, tried | {"lead"})
        elif "refine" not in tried and (mid := common_refinement(x.shape, out.shape)):
            # axes split and merged at once (Qwen3.5's (batch * tokens * heads, head_dim) back
            # to (batch, tokens, heads * head_dim)): through the shape both are merges of
            between = ShapeOnly(mid)
            if not self.reshape(x, layout, dim, between, "split", args, tried | {"refine"}):
                return False
            if (placed := self.layouts.get(id(between))) is None:
                return False  # a view whose reading waits for a later op
            return self.reshape(between, *placed, out, name, args, tried | {"refine"})
        else:
            return False
        if name in ("view", "reshape"):
            new, axis = self.info(out)
            self.note_literals(args, axis, out.shape[axis], new)
        elif name == "unflatten" and len(args) > 2 and isinstance(args[1], int):
            # x.unflatten(d, sizes): sizes spell the output axes d, d+1, ...
            new, axis = self.info(out)
            offset = args[1] % x.dim()
            if offset <= axis < offset + len(args[2]):
                shape = (0,) * offset + tuple(args[2])
                self.note_literals((x, shape), axis, out.shape[axis], new)
        return True

    def _merge(self, x, layout, dim, out, a, b) -> None:  # noqa: ANN001
        if dim < a:
            self.set(out, layout, dim)
        elif dim >= b:
            self.set(out, layout, dim - (b - a - 1))
        else:  # the tracked axis is merged: each channel spans `inner` features, `outer` times
            inner, outer = math.prod(x.shape[dim + 1 : b]), math.prod(x.shape[a:dim])
            merged = tuple(Segment(s.space, s.factor * inner) for s in layout)
            self.set(out, merged * outer, a)

    def _split(self, x, layout, dim, out, a, b) -> bool:  # noqa: ANN001
        if dim != a:
            self.set(out, layout, dim if dim < a else dim + (b - a - 1))
            return True
        outer = out.shape[a]
        repeats = math.prod(out.shape[a : b - 1])
        if repeats > 1 and len(layout) % repeats == 0:
            # (batch * heads) back to (batch, heads), or (batch * tokens * heads) back to
            # (batch, tokens, heads): the layout is one period per index of the outer axes
            period = layout[: len(layout) // repeats]
            if period * repeats == layout and self._width(period) == out.shape[b - 1]:
                self.set(out, period, b - 1)
                return True
        unit = math.prod(out.shape[a + 1 : b])  # features per index of the new outer axis
        heads = b - a >= 2 and a == x.dim() - 1  # (heads, head_dim); Falcon (kv, g + 2, hd)
        if heads and b - a == 2 and self.folded_split(layout, outer, out, a + 1):
            return True
        coarse = self._coarsened(layout, unit, heads=heads)
        if coarse is None:
            return False
        if heads and b - a == 2:
            self.note_split_site(coarse)
        self.set(out, coarse, a)
        return True

    def _coarsened(self, layout: Layout, unit: int, *, heads: bool) -> Layout | None:
        """``layout`` in units of ``unit`` features (flagged as heads when ``heads``), or None
        when a unit would straddle two spaces."""
        sizes = [self.table.sizes[self.table.find(seg.space)] * seg.factor for seg in layout]
        if any(size % unit for size in sizes):
            return None
        coarse = []
        for seg in layout:
            if unit % seg.factor == 0:
                space = self.table.coarsen(seg.space, unit // seg.factor)
                if heads:
                    self.table.flag(space, "heads")
                coarse.append(Segment(space, 1))
            elif seg.factor % unit == 0:
                coarse.append(Segment(seg.space, seg.factor // unit))
            else:
                return None
        return tuple(coarse)

    def repeat_interleave(self, x, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        """``x.repeat_interleave(r, dim=d)`` with an int ``r``: along the channel axis each unit
        is repeated ``r`` times in a row (grouped-query attention spreading a kv head over its
        query heads); along another axis the channels pass through."""
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        axis = dim_arg(args, kwargs, 2)
        if not isinstance(repeats, int) or axis is None:
            return False  # per-index repeats, or a flattening repeat: no channel mapping
        if int(axis) % x.dim() != dim:
            return self.pointwise(x, layout, dim, out)
        self.set(out, tuple(Segment(s.space, s.factor * repeats) for s in layout), dim)
        return True

    def gather(self, x, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        """``torch.gather(x, axis, index)`` along another axis than the channels', with the
        same index for every channel (DeBERTa's relative positions, expanded): output channel
        ``i`` reads only input channel ``i``, at the same places as every other."""
        axis = dim_arg(args, kwargs, 1)
        index = kwargs.get("index", args[2] if len(args) > 2 else None)
        if axis is None or int(axis) % x.dim() == dim or out.dim() != x.dim():
            return False
        if not isinstance(index, torch.Tensor) or (index.shape[dim] > 1 and index.stride(dim)):
            return False  # the places could differ from channel to channel
        return self.pointwise(x, layout, dim, out)

    def tile(self, x, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        """``x.repeat(r0, r1, ...)``: the whole axis is tiled ``r`` times, so along the channel
        axis its layout repeats (DeBERTa tiles its position keys, heads merged into the batch
        axis, once per sequence of the batch); leading new axes shift it."""
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        sizes = kwargs.get("repeats", sizes)
        if not sizes or not all(isinstance(r, int) for r in sizes) or len(sizes) < x.dim():
            return False
        at = dim + len(sizes) - x.dim()
        self.set(out, layout * sizes[at], at)
        return True

    def permute(self, x, name, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        order = permute_order(x.dim(), name, args, kwargs)
        if order is None:
            return False
        self.set(out, layout, order.index(dim))
        return True

    def reduce(self, x, name, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        if name in ("min", "max") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self.elementwise(args, out, kwargs)  # torch.min(x, other): elementwise
        axes = dim_arg(args, kwargs, 2 if name in NORMS else 1)
        if axes is None:
            return False
        axes = [int(d) % x.dim() for d in (axes if isinstance(axes, (tuple, list)) else [axes])]
        outs = list(out) if isinstance(out, tuple) else [out]
        if dim in axes:  # a statistic pooled over the channels: it stays valid on fewer
            if name not in {"mean", "sum", "var", "std", "amax", "amin", *NORMS}:
                return False
            for seg in layout:
                self.table.flag(seg.space, "pooled")
            return True
        for t in outs:
            keep = t.dim() == x.dim()
            self.set(t, layout, dim if keep else dim - sum(d < dim for d in axes))
        return True

    def getitem(self, x, args, layout, dim, out) -> bool:  # noqa: ANN001
        index = args[1] if len(args) > 1 else ()
        if isinstance(index, torch.Tensor) and dim > 0 and picks_rows(index):
            # x[rows]: rows of the first axis (tokens routed to an MoE expert); channels stay
            if out.dim() != x.dim() or out.shape[dim] != x.shape[dim]:
                return False
            self.set(out, layout, dim)
            return True
        axes = index_axes(x.shape, index)
        if axes is None:
            return False
        out_axis, sel = axes[dim]
        if out_axis < 0 and sel in (0, -1) and isinstance(out, torch.Tensor):
            return self.pick(layout, out)  # the first or last: there at any width
        if out_axis < 0:
            return False
        if sel == slice(None):
            self.set(out, layout, out_axis)
            return True
        if not isinstance(sel, slice):
            return False  # a list of channels
        start, stop, step = sel.indices(x.shape[dim])
        if step > 1 and sel.stop is None and start < step and x.shape[dim] % step == 0:
            # x[..., start::step] (GPT-OSS's interleaved gate and up, ``gate_up[..., ::2]`` and
            # ``[..., 1::2]``): a unit is ``step`` consecutive features, one of them picked
            coarse = self._coarsened(layout, step, heads=False)
            if coarse is None:
                return False
            self.set(out, coarse, out_axis)
            return True
        if step != 1 or stop <= start:
            return False
        pieces = self.split_layout(layout, [start, stop])
        if pieces is None:
            return False
        chosen = pieces[0 if start == 0 else 1]
        self.set(out, chosen, out_axis)
        # the bounds were computed from widths (Phi-3's ``qkv[..., :num_heads * head_dim]``);
        # an open end spells no width (DPN's ``x[:, self.num_1x1_c:]``: its attribute is the
        # start, and may equal the rest's width by chance)
        if start > 0:
            self.note_width(start, pieces[0])
        if sel.stop is not None:
            self.note_width(stop - start, chosen)
        return True

    def narrow_split(self, x, name, args, kwargs, layout, dim, out) -> bool:  # noqa: ANN001
        outs = list(out)
        if name == "unbind":
            axis = int(dim_arg(args, kwargs, 1, 0)) % x.dim()
            if axis == dim:
                return False
            for t in outs:
                self.set(t, layout, dim - (axis < dim))
            return True
        axis = int(dim_arg(args, kwargs, 2, 0)) % x.dim()
        if axis != dim:
            for t in outs:
                self.set(t, layout, dim)
            return True
        bounds = [0]
        for t in outs:
            bounds.append(bounds[-1] + t.shape[dim])
        pieces = self.split_layout(layout, bounds[1:-1])
        if pieces is None:
            return False
        sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections")
        sized = name in ("split", "split_with_sizes")  # not chunk counts or tensor_split indices
        for same in self._kept_equal(name, sizes, [t.shape[dim] for t in outs]):
            merged: Layout | None = pieces[same[0]]
            for i in same[1:]:
                merged = self.unify(merged, pieces[i]) if merged is not None else None
            if merged is None:
                return False
            for i in same:
                pieces[i] = merged
        for i, (t, piece) in enumerate(zip(outs, pieces, strict=True)):
            self.set(t, piece, dim)
            if sized and isinstance(sizes, int):
                self.note_width(sizes, piece, sizes=(sizes,), entry=0)  # one size for all
            elif sized and isinstance(sizes, (tuple, list)) and isinstance(sizes[i], int):
                # GPT-BigCode's (embed_dim, kv_dim, kv_dim); all of them at once when an
                # attribute holds the sizes (InceptionNeXt's split_indexes)
                whole = tuple(sizes) if all(type(v) is int for v in sizes) else ()
                self.note_width(sizes[i], piece, sizes=whole, entry=i if whole else -1)
        return True

    def _kept_equal(self, name: str, sizes: object, widths: list[int]) -> list[list[int]]:
        """Pieces of a split that must keep equal widths, as lists of their indices: all the
        full pieces of ``chunk(n)`` or ``split(k)`` (YOLOv8's ``cv1(x).chunk(2, 1)``), whose
        sizes follow from the total; the pieces of equal size in sizes written out in the call
        (``split((self.c, self.c), 1)``), which may come from one attribute. Not sizes an
        attribute holds whole (InceptionNeXt's ``split_indexes``): each entry is rewritten."""
        if name == "chunk" or (name == "split" and isinstance(sizes, int)):
            full = [i for i, w in enumerate(widths) if w == widths[0]]
            return [full] if len(full) > 1 else []
        if name not in ("split", "split_with_sizes") or not isinstance(sizes, (tuple, list)):
            return []
        held = self.running[-1] if self.running else None
        if held is not None and any(
            isinstance(v, (tuple, list)) and list(v) == list(sizes) for v in vars(held).values()
        ):
            return []
        by_width: dict[int, list[int]] = {}
        for i, w in enumerate(widths):
            by_width.setdefault(w, []).append(i)
        return [same for same in by_width.values() if len(same) > 1]

    def fresh_like(self, x, dim, out) -> bool:  # noqa: ANN001
        """``zeros_like(x)`` and kin: the same shape, none of x's values. The channel axis stays
        where it was, in a space of its own that whatever is later added in joins (Mixtral's
        experts ``index_add_`` their outputs into ``zeros_like(hidden_states)``)."""
        if out.shape != x.shape:
            return False
        self.fresh(out, dim)
        return True

    def new_from(self, x, dim, name, args, kwargs, out, context) -> bool:  # noqa: ANN001, PLR0913
        """``x.new_zeros(shape)`` and kin: like :meth:`fresh_like` where the shape is x's; else
        an untracked constant, followed as uniform like ``torch.zeros`` (x gives only its dtype
        and device)."""
        if not self.fresh_like(x, dim, out):
            self.uniform.follow(name, args, kwargs, out, context)
        return True

    def index_add(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        """``x.index_add_(axis, index, source)`` along an axis other than the channels':
        rows of ``source`` are added into rows of ``x``, so both name the same channels."""
        x = args[0]
        axis = int(dim_arg(args, kwargs, 1, 0)) % x.dim()
        source = args[3] if len(args) > 3 else kwargs.get("source")
        ix, isrc = self.info(x), self.info(source)
        if ix is None or isrc is None or x.dim() != source.dim():
            return False
        (lx, dx), (ls, ds) = ix, isrc
        if dx != ds or dx == axis:
            return False
        layout = self.unify(lx, ls)
        if layout is None:
            return False
        self.set(out, layout, dx)
        return True

    def split_layout(self, layout: Layout, cuts: list[int]) -> list[Layout] | None:
        """Cut a layout at feature positions; refines spaces where a cut falls inside one."""
        total = sum(self.table.sizes[self.table.find(s.space)] * s.factor for s in layout)
        bounds = sorted({0, total, *(c for c in cuts if 0 <= c <= total)})
        parts: list[list[Segment]] = [[] for _ in range(len(bounds) - 1)]
        offset = 0
        for seg in layout:
            size = self.table.sizes[self.table.find(seg.space)]
            end = offset + size * seg.factor
            inner = [c - offset for c in bounds if offset < c < end]
            if any(c % seg.factor for c in inner):
                return None
            for space, start, _ in self.table.refine(seg.space, {c // seg.factor for c in inner}):
                lo = offset + start * seg.factor
                part = max(i for i, b in enumerate(bounds) if b <= lo)
                parts[min(part, len(parts) - 1)].append(Segment(space, seg.factor))
            offset = end
        return [tuple(p) for p in parts]

    # -- several inputs ----------------------------------------------------------------------
    def unify(self, la: Layout, lb: Layout) -> Layout | None:
        """Make two layouts of one axis name the same channels; the coarser one survives.

        Layouts cut at different places (a concat added to one layer's output: GhostNet's
        primary and cheap halves plus the shortcut) are first cut at every boundary of both."""
        if self._bounds(la) != self._bounds(lb):
            if self._width(la) != self._width(lb):
                return None
            cuts = sorted(set(self._bounds(la)) | set(self._bounds(lb)))
            pieces_a, pieces_b = self.split_layout(la, cuts), self.split_layout(lb, cuts)
            if pieces_a is None or pieces_b is None:
                return None
            la = tuple(s for p in pieces_a for s in p)
            lb = tuple(s for p in pieces_b for s in p)
        if self._bounds(la) != self._bounds(lb):
            return None  # a segment of no width, or pieces that came out cut otherwise
        merged = []
        for a, b in zip(la, lb, strict=True):
            if a.factor == b.factor:
                merged.append(Segment(self.table.unite(a.space, b.space), a.factor))
            elif b.factor % a.factor == 0:
                coarse = self.table.coarsen(a.space, b.factor // a.factor)
                merged.append(Segment(self.table.unite(coarse, b.space), b.factor))
            elif a.factor % b.factor == 0:
                coarse = self.table.coarsen(b.space, a.factor // b.factor)
                merged.append(Segment(self.table.unite(coarse, a.space), a.factor))
            else:
                return None
        return tuple(merged)

    def elementwise(self, args: tuple, out: torch.Tensor, kwargs: dict | None = None) -> bool:
        given = [*args[:3], *(v for k, v in (kwargs or {}).items() if k != "out")]
        operands = [a for a in given if isinstance(a, torch.Tensor)]
        tracked = []  # (tensor, layout, output axis, whether it spans that axis whole)
        for t in operands:
            if (info := self.info(t)) is not None:
                at = info[1] + out.dim() - t.dim()
                tracked.append((t, info[0], at, at >= 0 and t.shape[info[1]] == out.shape[at]))
        axis = self._main_axis(tracked, out)
        if axis is None:
            return False
        layout = None
        for _, lt, at, whole in tracked:
            if at == axis and whole:
                merged = lt if layout is None else self.unify(layout, lt)
                if merged is None:
                    if not (self._all_blocked(layout) and self._all_blocked(lt)):
                        return False
                    # channels that stay whole (k * cos + rotate_half(k) * sin on a shared
                    # key/value head): which lies where no longer matters, only the axis
                    merged = layout
                layout = merged
        assert layout is not None
        for t, lt, at, whole in tracked:
            if at == axis and whole:
                continue
            if not self._broadcasts(t, axis, out):
                return False
            # a factor constant along our channels (MoE routing weights, a one-unit gate,
            # Mamba2's state repeated over its heads): its own channels run along another
            # axis, so they are left whole
            self.table.block_layout(lt, "broadcast against other channels")
        for t in operands:
            if self.info(t) is not None or self._broadcasts(t, axis, out):
                continue
            at = axis - (out.dim() - t.dim())
            if not (self.add_param(t, at, layout) or self.uniform_operand(t, at, layout)):
                # a constant with its own value per channel (a rotary table on a key/value
                # head shared by every query head): the channels stay whole, still on this axis
                self.table.block_layout(layout, "scaled by a constant with a value per channel")
        self.set(out, layout, axis)
        return True

    def _main_axis(self, tracked: list, out: torch.Tensor) -> int | None:
        """The output axis the channels run along: the one every operand spanning it whole
        agrees on, preferring operands whose channels may be pruned. An outer product of
        channels on two axes, each operand broadcast along the other's (Mamba's
        ``dt[..., None] * B[:, None]``), keeps the first operand's, unless that operand holds
        copies along the other's (Mamba2's state, repeated over the heads it is shared by);
        the caller leaves the other's whole."""
        whole = [(t, lt, at) for t, lt, at, w in tracked if w]
        free = [(t, at) for t, lt, at in whole if not self._all_blocked(lt)]
        axes = free or [(t, at) for t, _, at in whole]
        unshared = [
            at
            for t, at in axes
            if not any(
                other != at and self.copies.along(t, other - (out.dim() - t.dim()))
                for _, other in axes
            )
        ]
        return (unshared or [at for _, at in axes] or [None])[0]

    def _bounds(self, layout: Layout) -> list[int]:
        """Feature positions where one segment of the layout ends and the next begins, in
        order (a segment of no width repeats its position)."""
        bounds, offset = [], 0
        for seg in layout[:-1]:
            offset += self.table.sizes[self.table.find(seg.space)] * seg.factor
            bounds.append(offset)
        return bounds

    def _width(self, layout: Layout) -> int:
        return sum(self.table.sizes[self.table.find(s.space)] * s.factor for s in layout)

    def _all_blocked(self, layout: Layout) -> bool:
        return all(self.table.find(s.space) in self.table.blocked for s in layout)

    def _broadcasts(self, t: torch.Tensor, axis: int, out: torch.Tensor) -> bool:
        """Whether ``t`` holds one value all along output ``axis``: it lacks the axis, has one
        entry there, or copies of one value (Mamba2's state repeated over the heads). Copies
        made with a width that does not follow the channels break the pruned model, which the
        pruning's forward check then refuses."""
        at = axis - (out.dim() - t.dim())
        return at < 0 or t.shape[at] == 1 or self.copies.along(t, at)

    def cat(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        tensors = list(args[0])
        cat_dim = int(dim_arg(args, kwargs, 1, 0)) % out.dim()
        infos = [self.info(t) for t in tensors]
        known = [i for i in infos if i is not None]
        dims = {i[1] for i in known}
        if len(dims) != 1:
            return False
        dim = dims.pop()
        if cat_dim == dim:
            if any(i is None and t.numel() > 0 for i, t in zip(infos, tensors, strict=True)):
                return False
            self.set(out, tuple(seg for layout, _ in known for seg in layout), dim)
            return True
        layout = self._shared_layout(tensors, infos, dim)
        if layout is None:
            return False
        self.set(out, layout, dim)
        return True

    def _shared_layout(self, tensors: list, infos: list, dim: int) -> Layout | None:
        """The channels every tensor of a cat (along another axis) or a stack names along
        ``dim``: the tracked ones are united, an untracked one must be a parameter sliced
        there too. None when they cannot be made one."""
        known = [info[0] for info in infos if info is not None]
        layout = known[0]
        for other in known[1:]:
            layout = self.unify(layout, other)
            if layout is None:
                return None
        for t, info in zip(tensors, infos, strict=True):
            if info is None and t.numel() > 0 and not self.add_param(t, dim, layout):
                return None
        return layout

    def stacked(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        """``torch.stack`` along a new axis (e.g. the interleaved rotary embedding of GPT-J,
        Cohere and GLM): every input names the same channels, which move past the new axis
        when it comes before them."""
        tensors = list(args[0])
        new_axis = int(dim_arg(args, kwargs, 1, 0)) % out.dim()
        infos = [self.info(t) for t in tensors]
        known = [i for i in infos if i is not None]
        if len({i[1] for i in known}) != 1:
            return False
        dim = known[0][1]
        layout = self._shared_layout(tensors, infos, dim)
        if layout is None:
            return False
        self.set(out, layout, dim + (new_axis <= dim))
        return True

    def matmul(self, args: tuple, out: torch.Tensor) -> bool:
        a, b = args[0], args[1]
        ia, ib = self.info(a), self.info(b)
        if a.dim() < 2 or b.dim() < 2:
            return False
        if (by_param := self._param_matmul(a, b, ia, ib, out)) is not None:
            return by_param
        shared = self._shared_head(a, b, ia, ib)
        if shared:
            ia, ib = (None, ib) if shared == "a" else (ia, None)
        sums = ((ia, a.dim() - 1, ib, b.dim() - 2), (ib, b.dim() - 2, ia, a.dim() - 1))
        fixed = [
            info is not None and info[1] == axis and (other is None or other[1] != other_axis)
            for info, axis, other, other_axis in sums
        ]
        for info, summed in zip((ia, ib), fixed, strict=True):
            if summed:
                # summed against an axis that keeps all its entries (Mamba's scan state
                # times C): these channels stay whole; the other operand's go on
                self.table.block_layout(info[0], "summed against a tensor of fixed width")
        ia, ib = (None if fixed[0] else ia), (None if fixed[1] else ib)
        if ia is None and ib is None:
            self.fresh(out, -1, blocked="summed against a tensor of fixed width")
            return True
        batch = out.dim() - 2
        placed = []
        for t, info, contracted in ((a, ia, a.dim() - 1), (b, ib, b.dim() - 2)):
            if info is None:
                continue
            layout, dim = info
            if dim == contracted:
                return False
            if dim >= t.dim() - 2:  # rows of a or columns of b: they pass straight through
                placed.append((layout, out.dim() - 2 if t is a else out.dim() - 1, None))
            else:
                placed.append((layout, dim + out.dim() - t.dim(), t))
        axes = {p[1] for p in placed}
        if len(axes) != 1:
            return False
        axis = axes.pop()
        layout = placed[0][0]
        if len(placed) == 2:
            layout = self.unify(layout, placed[1][0])
            if layout is None:
                return False
        elif axis < batch:  # a tracked batch axis against an untracked operand
            other, tracked = (b, a) if ia is not None else (a, b)
            at = axis - (out.dim() - other.dim())
            # a shared key/value head may come repeated once per query head (HF's repeat_kv)
            sizes = (1, tracked.shape[axis - (out.dim() - tracked.dim())]) if shared else (1,)
            if (
                at >= 0
                and other.shape[at] not in sizes
                and not self.uniform_operand(other, at, layout)  # a recurrent state's zeros
            ):
                return False
        self.set(out, layout, axis)
        return True

    def _param_matmul(self, a, b, ia, ib, out) -> bool | None:  # noqa: ANN001
        """A 2-D parameter times a tensor whose channels it sums over (Mamba's
        ``dt_proj.weight @ x``, or ``x @ W``): a linear layer written out. The parameter's
        contracted axis reads the channels; its other axis writes a new space, on the
        output's rows for ``W @ x`` and its columns for ``x @ W``. None when this is not
        such a product."""
        for w, info, w_axis, x_axis in ((a, ib, 1, b.dim() - 2), (b, ia, 0, a.dim() - 1)):
            if info is None or info[1] != x_axis or w.dim() != 2 or id(w) not in self.params:
                continue
            if self.info(w) is not None or not self.add_param(w, w_axis, info[0]):
                return False
            self.fresh(out, -2 if w is a else -1)
            self.add_param(w, 1 - w_axis, self.info(out)[0], role="param_out")
            return True
        return None

    def linear_fn(self, args: tuple, kwargs: dict, x, layout, dim, out) -> bool:  # noqa: ANN001
        """``F.linear(x, W, b)`` with the module's own parameters: W's columns read the
        channels; its rows and ``b`` write a new space."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if dim != x.dim() - 1 or not self.add_param(weight, 1, layout):
            return False
        self.fresh(out, -1)
        produced = self.info(out)[0]
        if self.add_param(weight, 0, produced, role="param_out"):
            self.same_rows_same_space(weight, 0, produced)
        if isinstance(bias, torch.Tensor):
            self.add_param(bias, 0, produced, role="param_out")
        return True

    def depthwise_fn(self, args: tuple, kwargs: dict, x, layout, dim, out) -> bool:  # noqa: ANN001
        """``F.conv1d(x, W, b, groups=C)`` with one filter per channel (C the input's channels
        and the output's; Mamba's causal conv runs its layer's weight so) and W a parameter:
        each channel is filtered alone, so the output's channels are the input's, and W's and
        b's rows go with them. A depthwise conv layer's own weight and bias make the layer a
        member as when it is called (its group count follows)."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        channels = x.shape[1]
        if dim != 1 or out.dim() != x.dim() or out.shape[1] != channels or groups != channels:
            return False
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape[:2]) != (channels, 1):
            return False
        entry = self.params.get(id(weight))
        if entry is None or entry[2][0] is None:
            return False
        owner = self.modules.get(entry[0])
        own_bias = bias is None or self.params.get(id(bias), ())[:2] == (entry[0], "bias")
        if (
            isinstance(owner, torch.nn.modules.conv._ConvNd)
            and owner.groups == owner.in_channels == owner.out_channels
            and (entry[1], entry[2][0]) == ("weight", 0)
            and own_bias
        ):
            self.table.add_member(layout, entry[0], "depthwise")
        elif not self.add_param(weight, 0, layout) or (
            isinstance(bias, torch.Tensor) and not self.add_param(bias, 0, layout)
        ):
            return False
        self.set(out, layout, 1)
        return True

    def same_rows_same_space(self, weight: torch.Tensor, axis: int, produced: Layout) -> None:
        """The same rows of one parameter write the same channels, call after call: the
        experts of an MoE layer are slices of one stacked tensor, run one after another."""
        if id(weight) not in self.params:
            return  # parameters concatenated: each piece's rows were added on their own
        module_name, pname, dims = self.params[id(weight)]
        key = (module_name, pname, dims[axis])
        earlier = self.param_outputs.setdefault(key, produced[0].space)
        if earlier != produced[0].space:
            self.table.unite(earlier, produced[0].space)

    def grouped_mm(self, args: tuple, x, layout, dim, out) -> bool:  # noqa: ANN001
        """``grouped_mm(x (S, K), w (E, K, N), offs)`` with ``w`` from a module's stacked
        expert weights (the MoE kernel of transformers 5): each row of ``x`` is multiplied by
        one expert's matrix, so ``K`` reads x's channels and ``N`` writes a new space shared by
        every expert."""
        weight = args[1] if len(args) > 1 else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or dim != x.dim() - 1:
            return False
        if out.dim() != 2 or not self.add_param(weight, 1, layout):
            return False
        self.fresh(out, -1)
        produced = self.info(out)[0]
        if self.add_param(weight, 2, produced, role="param_out"):
            self.same_rows_same_space(weight, 2, produced)
        return True

    def gathered_bmm(self, args: tuple, x, layout, dim, out) -> bool:  # noqa: ANN001
        """``bmm`` of token rows with one matrix per row gathered from a module's stacked
        expert weights, ``W[ids]`` (transformers' ``batched_mm`` experts): either
        ``W[ids] (S, N, K) @ x (S, K, 1)`` or ``x (S, 1, K) @ W[ids] (S, K, N)``. ``K`` reads
        x's channels, ``N`` writes a new space shared by every expert."""
        a, b = args[0], args[1]
        if a.dim() != 3 or b.dim() != 3 or x.dim() != 3:
            return False
        if b is x and dim == 1 and id(a) in self.params:
            weight, read, write = a, 2, 1
        elif a is x and dim == 2 and id(b) in self.params:
            weight, read, write = b, 1, 2
        else:
            return False
        if not self.add_param(weight, read, layout):
            return False
        self.fresh(out, write)
        produced = self.info(out)[0]
        if self.add_param(weight, write, produced, role="param_out"):
            self.same_rows_same_space(weight, write, produced)
        return True

    def norm_fn(self, args: tuple, kwargs: dict, x, layout, dim, out) -> bool:  # noqa: ANN001
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        if dim != x.dim() - 1 or len(tuple(shape)) != 1:
            return False
        for t in (*args[2:4], kwargs.get("weight"), kwargs.get("bias")):
            if isinstance(t, torch.Tensor) and not self.add_param(t, 0, layout):
                return False
        for seg in layout:
            self.table.flag(seg.space, "pooled")
        self.set(out, layout, dim)
        (width,) = tuple(shape)
        if isinstance(width, int):
            self.note_width(width, layout)  # a module's own normalized_shape (OLMo's LayerNorm)
        return True
