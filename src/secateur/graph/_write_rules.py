"""Op rules for writes into part of a tensor: ``dst[index] = value`` and
``dst[index].copy_(value)``, the way a fresh tensor is filled piece by piece (torchvision's
multi-scale RoI pooling, one pyramid level at a time; DeepSeek's multi-head latent attention,
each head's own key channels beside a rotary part shared by every head).

A mixin of :class:`~secateur.graph._ops.OpRules`, which provides ``table``, ``info``, ``set``,
``unify``, ``uniform_operand``, ``note_literals``, ``notes``, ``params``, ``param_mixes``,
``param_cats``, ``fresh_made`` and ``unchecked_writes``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ._shapes import basic_selectors, index_axes

_SHARED = "written into part of an axis of another tensor"
_UNFOLLOWED = "written through a view the trace does not follow"
_OVERWRITTEN = "overwritten in part of their axis, or with a value per channel"


def write_axes(shape: torch.Size, key: Any) -> list[tuple[int, Any]] | None:
    """As :func:`index_axes` for the key of ``dst[key] = value``, also for one boolean mask
    beside slices (``h[~valid] = 0``): the axes it covers become one axis of the entries it
    picks. None for ``None`` in the key and other advanced indexing."""
    keys = list(key) if isinstance(key, tuple) else [key]
    masks = [i for i, k in enumerate(keys) if isinstance(k, torch.Tensor) and k.dtype == torch.bool]
    if any(k is None for k in keys) or len(masks) > 1:
        return None
    if not masks:
        return index_axes(shape, key)
    i, mask = masks[0], keys[masks[0]]
    if mask.dim() == 0 or not all(
        k is Ellipsis or type(k) is slice for j, k in enumerate(keys) if j != i
    ):
        return None
    explicit = sum(mask.dim() if j == i else 1 for j, k in enumerate(keys) if k is not Ellipsis)
    start = sum(1 if k is not Ellipsis else len(shape) - explicit for k in keys[:i])
    if tuple(shape[start : start + mask.dim()]) != tuple(mask.shape):
        return None
    axes = index_axes(shape, tuple(keys[:i] + [slice(None)] * mask.dim() + keys[i + 1 :]))
    if axes is None:
        return None
    first, gone = axes[start][0], mask.dim() - 1
    return [
        (first, ("tensor", 1)) if a == start
        else (-1, ("tensor", 0)) if start < a < start + mask.dim()
        else (o - gone if o > first else o, sel)
        for a, (o, sel) in enumerate(axes)
    ]  # fmt: skip


def _slice_dim(axes: list[tuple[int, Any]]) -> int:
    """The number of axes of the slice that ``axes`` (from :func:`index_axes`) picks."""
    return sum(sel[1] if isinstance(sel, tuple) else 1 for o, sel in axes if o >= 0)


def _whole(sel: Any, size: int) -> bool:
    return isinstance(sel, slice) and range(*sel.indices(size)) == range(size)


class WriteRules:
    """Rules for writes into part of a tensor; see the module docstring."""

    def setitem(self, dst: torch.Tensor, key: Any, value: Any) -> None:
        """``dst[key] = value``: as :meth:`write`, with ``key`` basic indexing, or one list,
        integer tensor (torchvision's ``result[idx_in_level] = level_result``) or boolean mask
        of rows. Index values computed from channels keep those channels whole."""
        for k in tree_flatten(key)[0]:
            if isinstance(k, torch.Tensor) and (info := self.info(k)) is not None:
                self.table.block_layout(info[0], "their values pick the entries a write fills")
        self.write(dst, write_axes(dst.shape, key), value)

    def write_slice(self, dst: Any, key: Any, view: torch.Tensor, value: Any) -> None:
        """``dst[key].copy_(value)``, with ``view`` the slice ``dst[key]`` made (``dst`` None:
        a view the trace does not follow), as :meth:`write`; the slice takes the channels dst
        takes there."""
        axes = basic_selectors(dst.shape, key) if isinstance(dst, torch.Tensor) else None
        self.write(dst, axes, value, view)

    def write(self, dst: Any, axes: Any, value: Any, view: torch.Tensor | None = None) -> None:
        """A write of ``value`` into the entries of ``dst`` that ``axes`` (per axis of dst:
        its axis in the slice or -1, and its selector) picks.

        Where the slice spans a channel axis of ``value`` whole, dst takes those channels
        there (DeepSeek's MLA copies its per-head keys into a fresh tensor): joined with its
        own, or, for a fresh dst, when the width it was made with follows them and no earlier
        write put a value per entry along that axis. A value's channels written anywhere else
        stay whole. Dst keeps its own channels only when the slice spans them whole and the
        value holds one value for all of them there (a rotary key broadcast to every head, a
        constant): anything else written there would not lose the channels dst loses.
        Writes into a parameter, or through a view the trace does not follow (its base is out
        of sight), keep every channel they touch whole; a tracked view still takes a constant.
        """
        ivalue = self.info(value)
        idst = self.info(dst)
        number = isinstance(value, (int, float))
        if (
            axes is None
            or not (number or isinstance(value, torch.Tensor))
            or (not number and value.dim() > _slice_dim(axes))
            or (dst._base is not None and idst is None)
            or any(id(dst) in held for held in (self.params, self.param_mixes, self.param_cats))
        ):
            for info in (ivalue, idst, self.info(view)):
                if info is not None:
                    self.table.block_layout(info[0], _UNFOLLOWED)
            self._written_per_entry(dst if isinstance(dst, torch.Tensor) else view)
            return
        shift = _slice_dim(axes) - (0 if number else value.dim())  # value broadcasts from the right
        at = {o - shift: a for a, (o, _) in enumerate(axes) if o >= 0}
        if ivalue is not None:
            layout, vdim = ivalue
            a = at.get(vdim)
            spans = a is not None and _whole(axes[a][1], dst.shape[a]) and dst._base is None
            if spans and value.shape[vdim] == dst.shape[a]:
                joined = None
                if idst is None and self._fresh_width(dst, a, layout):
                    joined = layout
                elif idst is not None and idst[1] == a:
                    joined = self.unify(idst[0], layout)
                if joined is not None:
                    self.set(dst, joined, a)
                    if view is not None:
                        self.set(view, joined, vdim + shift)
                    return
            self.table.block_layout(layout, _SHARED)
        if idst is None:
            per_entry = {
                a
                for a in range(dst.dim())
                if not self._one_value(value, axes, a, dst.shape[a], shift)
            }
            self.unchecked_writes.setdefault(id(dst), set()).update(per_entry)
            self.keepalive.append(dst)
            return
        layout, a = idst
        if not self._one_value(value, axes, a, dst.shape[a], shift, layout):
            self.table.block_layout(layout, _OVERWRITTEN)

    def _written_per_entry(self, t: Any) -> None:
        """Mark every axis of ``t`` and of the tensor it views as holding a value per entry."""
        if not isinstance(t, torch.Tensor):
            return
        for u in (t, t._base):
            if u is not None:
                self.unchecked_writes[id(u)] = set(range(u.dim()))
                self.keepalive.append(u)

    def _fresh_width(self, dst: torch.Tensor, axis: int, layout: Any) -> bool:
        """Whether ``dst``, made fresh (zeros, empty, ``new_empty``, ...) and untracked, may
        take channels along ``axis``: no earlier write put a value per entry there, and the
        width it was made with is noted where it was made (read off a tensor's shape, or an
        attribute that will be rewritten)."""
        made = self.fresh_made.get(id(dst))
        if made is None or axis in self.unchecked_writes.get(id(dst), ()):
            return False
        # made by zeros/ones/full: an op that read its width before keeps it (see read_uniform)
        filled = self.filled.get(id(dst), {}).get(axis - dst.dim())
        key = None if filled is None else (filled.serial, filled.ndim + axis - dst.dim())
        if key is not None and key in self.uniform_read:
            return False
        if key is not None and (earlier := self.uniform_layouts.get(key)) is not None:
            return self.unify(earlier, layout) is not None  # its width is noted already
        sizes, context = made
        noted = len(self.notes)
        self.note_literals((None, *sizes), axis, dst.shape[axis], layout, context)
        if len(self.notes) == noted:
            return False
        if key is not None:  # an op that reads its width later blocks the layout
            self.uniform_layouts[key] = layout
        return True

    def _one_value(self, value, axes, axis, size, shift, layout=None) -> bool:  # noqa: ANN001
        """Whether a write through ``axes`` spans dst's ``axis`` (of ``size`` entries) whole
        with one value for all its entries: the value lacks that axis, has one entry on it,
        broadcasts along it (stride 0), or is a constant made with a width that follows
        ``layout``."""
        out_axis, sel = axes[axis]
        if out_axis < 0 or not _whole(sel, size):
            return False
        v = out_axis - shift
        if not isinstance(value, torch.Tensor) or v < 0:  # a number, or no such axis
            return True
        if value.shape[v] == 1 or value.stride(v) == 0:
            return True
        return layout is not None and self.uniform_operand(value, v, layout)
