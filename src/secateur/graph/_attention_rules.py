"""Op rules for attention: scaled-dot-product attention, multi-query attention (one key/value
head shared by every query head, under sdpa or written as matmuls), and q, k and v packed in one
view of the channels, read once the op that picks from it is known.

A mixin of :class:`~secateur.graph._ops.OpRules`, which provides ``table``, ``info``, ``set``,
``fresh``, ``unify``, ``split_layout``, ``_split``, ``_coarsened``, ``note_literals``, ``add_param``
and ``uniform_operand``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ._shapes import PERMUTE, ShapeOnly, dim_arg, index_axes, permute_order
from ._spaces import Layout, Segment


@dataclass(frozen=True)
class PendingView:
    """A view of the channel axis ``axis`` (of ``x_shape``, laid out as ``layout``) into
    several axes, waiting for the op that reads it. ``context`` is where the view ran, for the
    width it may note."""

    x_shape: tuple[int, ...]
    layout: Layout
    axis: int
    out_shape: tuple[int, ...]
    name: str
    args: tuple
    context: tuple | None


@dataclass(frozen=True)
class DeferredView(PendingView):
    """A view of the channel axis into three axes ``(outer, inner, head_dim)``: ``unbind`` or
    an int index along ``outer`` makes ``outer`` a selector of q, k and v, each with ``inner``
    heads (ModernBERT's ``view(b, t, 3, heads, hd)``); anything else makes ``outer`` the unit
    (Falcon's ``(kv groups, heads + 2, hd)``)."""

    heads: tuple[Layout, ...] | None = None  # per outer index, once read as a selector
    # where (outer, heads, head_dim) lie now, once permuted (torchvision Swin's
    # ``reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)``); None: axis, axis + 1, axis + 2
    placed: tuple[int, int, int] | None = None

    @property
    def axes(self) -> tuple[int, int, int]:
        return self.placed or (self.axis, self.axis + 1, self.axis + 2)


class AttentionRules:
    """Rules for attention ops; see the module docstring."""

    def settle(self, t: torch.Tensor) -> None:
        """Give a deferred view its default reading: the outer axis is the unit. One already
        read as a selector and now used whole is left whole."""
        view = self.deferred.pop(id(t))
        if not isinstance(view, DeferredView):
            self.settle_grouped(t, view)
            return
        a, outer = view.axis, view.axes[0]
        reason = f"op '{view.name}' has no channel rule"
        unpermuted = ShapeOnly(view.out_shape)
        if view.heads is not None:
            reason = "q, k and v packed in one tensor, used whole"
            for layout in view.heads:
                self.table.block_layout(layout, reason)
            self.fresh(t, outer, blocked=reason)
        elif self._split(ShapeOnly(view.x_shape), view.layout, a, unpermuted, a, a + 3):
            new, axis = self.layouts.pop(id(unpermuted))
            self.set(t, new, view.axes[axis - a] if a <= axis < a + 3 else outer)
            self.note_literals(view.args, axis, view.out_shape[axis], new, view.context)
        else:
            self.table.block_layout(view.layout, reason)
            self.fresh(t, outer, blocked=reason)

    def select_deferred(self, x, name, args, kwargs, out) -> bool:  # noqa: ANN001
        """``unbind`` or an int index along a deferred view's outer axis: each selected
        ``(heads, head_dim)`` block is a piece of the channels, split into heads."""
        view = self.deferred[id(x)]
        if not isinstance(view, DeferredView):
            return self.read_grouped(x, name, args, kwargs, out)
        a = view.axis
        outer, heads_at, _ = view.axes
        if name in PERMUTE and isinstance(out, torch.Tensor):
            order = permute_order(x.dim(), name, args, kwargs)
            if order is None:
                return False
            placed = tuple(order.index(i) for i in view.axes)
            self.deferred[id(out)] = replace(view, placed=placed)  # type: ignore[arg-type]
            self.keepalive.append(out)
            return True
        if name == "unbind" and int(dim_arg(args, kwargs, 1, 0)) % x.dim() == outer:
            picks = list(enumerate(out))
            heads_at -= heads_at > outer
        elif name == "__getitem__" and len(args) > 1:
            axes = index_axes(x.shape, args[1])
            if axes is None or not isinstance(axes[outer][1], int):
                return False
            if any(o < 0 or sel != slice(None) for i, (o, sel) in enumerate(axes) if i != outer):
                return False
            picks = [(axes[outer][1] % x.shape[outer], out)]
            heads_at = axes[heads_at][0]  # a new axis in front moves the heads
        else:
            return False
        if not all(isinstance(t, torch.Tensor) for _, t in picks):
            return False
        if view.heads is None:
            shape = view.out_shape  # as the view made it, before any permute
            block, count = math.prod(shape[a + 1 :]), shape[a]
            pieces = self.split_layout(view.layout, [k * block for k in range(1, count)])
            if pieces is None or len(pieces) != count:
                return False
            heads = [self._coarsened(p, shape[a + 2], heads=True) for p in pieces]
            if any(h is None for h in heads):
                return False
            view = replace(view, heads=tuple(heads))  # type: ignore[arg-type]
            self.deferred[id(x)] = view
            # a head count spelled in the view (``view(b, t, 3, self.num_heads, hd)``)
            self.note_literals(view.args, a + 1, shape[a + 1], view.heads[0], view.context)
        for index, t in picks:
            self.set(t, view.heads[index], heads_at)
        return True

    def attention(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        given = [*args[:3], None, None, None][:3]
        q, k, v = (kwargs.get(n, a) for n, a in zip(("query", "key", "value"), given, strict=True))
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return False
        infos = [self.info(t) for t in (q, k, v)]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if self._multi_query(q, (k, v), infos, out):
            if isinstance(mask, torch.Tensor) and not self._mask_follows(mask, infos[0][0], out):
                self.table.block_layout(infos[0][0], "a mask with a value per head")
            return True
        if any(i is None for i in infos) or any(
            i[1] != t.dim() - 3 for i, t in zip(infos, (q, k, v), strict=True)
        ):
            return False
        rep = q.shape[-3] // k.shape[-3] if kwargs.get("enable_gqa") else 1
        layout = infos[0][0]
        for (lt, _), t in zip(infos[1:], (k, v), strict=True):
            if q.shape[-3] != t.shape[-3] * rep:
                return False
            layout = self.unify(layout, tuple(Segment(s.space, s.factor * rep) for s in lt))
            if layout is None:
                return False
        if isinstance(mask, torch.Tensor) and not self._mask_follows(mask, layout, out):
            return False
        self.set(out, layout, out.dim() - 3)
        return True

    def _mask_follows(self, mask: torch.Tensor, layout: Layout, out: torch.Tensor) -> bool:
        """An additive mask with a value per head (BEiT's relative position bias, a
        ``(1, heads, n, n)`` gather from a parameter) loses the heads the output loses, and
        so does one that holds the same values for every head (T5's cross-attention zeros,
        made from the head count); one that broadcasts over the heads is left alone; any
        other blocks them."""
        at = mask.dim() - 3  # the heads axis of (..., heads, L, S)
        if at < 0 or mask.shape[at] == 1:
            return True
        if (info := self.info(mask)) is not None:
            return info[1] == at and self.unify(layout, info[0]) is not None
        return self.add_param(mask, at, layout) or self.uniform_operand(mask, at, layout)

    def _multi_query(self, q, kv, infos, out) -> bool:  # noqa: ANN001
        """Multi-query attention (GPT-BigCode): one key/value head broadcast to every query
        head, so k and v carry channels only inside the head (their last axis) while q's are
        whole heads. Each query head then attends on its own: the output's heads are q's; the
        shared head's channels stay whole."""
        if infos[0] is None or infos[0][1] != q.dim() - 3:
            return False
        if any(i is None or i[1] != t.dim() - 1 for i, t in zip(infos[1:], kv, strict=True)):
            return False
        for layout, _ in infos[1:]:
            self.table.block_layout(layout, "a key/value head shared by every query head")
        self.flag_shared_kv(infos[0][0])
        self.set(out, infos[0][0], out.dim() - 3)
        return True

    def are_heads(self, layout: Layout) -> bool:
        """Whether every unit of ``layout`` is a whole head (a ``(heads, head_dim)`` view)."""
        flagged = {self.table.find(i) for i, names in self.table.flags.items() if "heads" in names}
        return all(self.table.find(s.space) in flagged for s in layout)

    def flag_shared_kv(self, heads: Layout) -> None:
        """Mark query heads that share one key/value head: their groups count query heads."""
        for seg in heads:
            self.table.flag(seg.space, "shared_kv")

    def _shared_head(self, a, b, ia, ib) -> str | None:  # noqa: ANN001
        """Eager multi-query attention (``q @ k.T``, ``probs @ v``): one operand carries whole
        heads on a batch axis, the other channels inside one shared head (on its last two
        axes). Each head is computed on its own, so the heads go on; the shared head's channels
        stay whole. Returns which operand ("a" or "b") was set aside, or None."""
        if ia is None or ib is None or a.dim() < 3 or b.dim() < 3:
            return None
        a_heads, b_heads = ia[1] < a.dim() - 2, ib[1] < b.dim() - 2
        if a_heads == b_heads:
            return None
        inner, info = ("b", ib) if a_heads else ("a", ia)
        self.table.block_layout(info[0], "a key/value head shared by every query head")
        self.flag_shared_kv((ia if a_heads else ib)[0])
        return inner
