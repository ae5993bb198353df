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

from ._shapes import index_axes

_SHARED = "written into part of an axis of another tensor"
_UNFOLLOWED = "written through a view the trace does not follow"


def basic_selectors(shape: torch.Size, key: Any) -> list[tuple[int, Any]] | None:
    """Per axis of a tensor of ``shape``, ``(axis in tensor[key] or -1, slice or int)`` when
    ``key`` is basic indexing by ints, slices and ``...`` (a view); None otherwise."""
    keys = key if isinstance(key, tuple) else (key,)
    if any(k is None for k in keys):
        return None
    axes = index_axes(shape, key)
    if axes is None or len(axes) != len(shape):
        return None
    if not all(type(sel) in (int, slice) for _, sel in axes):
        return None
    return axes


def _whole(sel: Any, size: int) -> bool:
    return isinstance(sel, slice) and range(*sel.indices(size)) == range(size)


class WriteRules:
    """Rules for writes into part of a tensor; see the module docstring."""

    def setitem(self, args: tuple) -> bool:
        """``dst[index] = value`` where the index leaves the channel axis whole: the value's
        channels land on dst's (torchvision's multi-scale RoI pooling fills a zeros tensor one
        pyramid level at a time), so both name the same channels. A constant written into a
        tracked tensor leaves its channels as they were."""
        if len(args) != 3 or not isinstance(args[0], torch.Tensor):
            return False
        dst, key, value = args
        keys = key if isinstance(key, tuple) else (key,)
        rows = [k for k in keys if isinstance(k, torch.Tensor)]
        if (
            len(keys) > dst.dim()
            or id(dst) in self.params
            or len(rows) > 1
            or any(k.dim() != 1 or k.is_floating_point() for k in rows)
            or id(dst) in self.param_mixes
            or id(dst) in self.param_cats
            or not all(type(k) in (slice, int) or isinstance(k, torch.Tensor) for k in keys)
        ):
            return False
        kept = [i for i in range(dst.dim()) if i >= len(keys) or type(keys[i]) is not int]
        whole = [
            i >= len(keys) or (isinstance(keys[i], slice) and keys[i] == slice(None))
            for i in range(dst.dim())
        ]
        idst, ivalue = self.info(dst), self.info(value)
        if ivalue is None:
            number = isinstance(value, (int, float)) or (
                isinstance(value, torch.Tensor) and value.numel() == 1
            )
            return number and idst is not None and whole[idst[1]]
        layout, dim = ivalue
        pos = dim + len(kept) - value.dim()
        if not 0 <= pos < len(kept):
            return False
        axis = kept[pos]
        if not whole[axis] or dst.shape[axis] != value.shape[dim]:
            return False
        if idst is not None and (
            idst[1] != axis or (layout := self.unify(idst[0], layout)) is None
        ):
            return False
        self.set(dst, layout, axis)
        return True

    def write_slice(self, dst: Any, key: Any, view: torch.Tensor, value: Any) -> None:
        """``dst[key].copy_(value)``, with ``key`` basic indexing and ``view`` the slice
        ``dst[key]`` made (``dst`` None: a view the trace does not follow).

        Where the slice spans a channel axis of ``value`` whole, dst takes those channels
        there (DeepSeek's MLA copies its per-head keys into a fresh tensor): joined with its
        own, or, for a fresh dst, when the width it was made with follows them and no earlier
        write put a value per entry along that axis. A value's channels written anywhere else
        stay whole. Dst keeps its own channels only when the slice spans them whole and the
        value holds one value for all of them there (a rotary key broadcast to every head, a
        constant): anything else written there would not lose the channels dst loses."""
        axes = basic_selectors(dst.shape, key) if isinstance(dst, torch.Tensor) else None
        ivalue = self.info(value)
        if (
            axes is None
            or dst._base is not None
            or not isinstance(value, torch.Tensor)
            or value.dim() > view.dim()
        ):
            for info in (ivalue, self.info(dst), self.info(view)):
                if info is not None:
                    self.table.block_layout(info[0], _UNFOLLOWED)
            return
        shift = view.dim() - value.dim()  # value broadcasts to the slice from the right
        at = {o - shift: a for a, (o, _) in enumerate(axes) if o >= 0}
        idst = self.info(dst)
        if ivalue is not None:
            layout, vdim = ivalue
            a = at.get(vdim)
            spans = a is not None and _whole(axes[a][1], dst.shape[a])
            if spans and value.shape[vdim] == dst.shape[a]:
                joined = None
                if idst is None and self._fresh_width(dst, a, layout):
                    joined = layout
                elif idst is not None and idst[1] == a:
                    joined = self.unify(idst[0], layout)
                if joined is not None:
                    self.set(dst, joined, a)
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
            self.table.block_layout(layout, _SHARED)

    def _fresh_width(self, dst: torch.Tensor, axis: int, layout: Any) -> bool:
        """Whether ``dst``, made fresh (zeros, empty, ``new_empty``, ...) and untracked, may
        take channels along ``axis``: no earlier write put a value per entry there, and the
        width it was made with is noted where it was made (read off a tensor's shape, or an
        attribute that will be rewritten)."""
        made = self.fresh_made.get(id(dst))
        if made is None or axis in self.unchecked_writes.get(id(dst), ()):
            return False
        sizes, size_kw, context = made
        if size_kw is not None:
            sizes = (size_kw,)
        noted = len(self.notes)
        self.note_literals((None, *sizes), axis, dst.shape[axis], layout, context)
        return len(self.notes) > noted

    def _one_value(self, value, axes, axis, size, shift, layout=None) -> bool:  # noqa: ANN001
        """Whether a write through ``axes`` spans dst's ``axis`` (of ``size`` entries) whole
        with one value for all its entries: the value lacks that axis, has one entry on it,
        broadcasts along it (stride 0), or is a constant made with a width that follows
        ``layout``."""
        out_axis, sel = axes[axis]
        if out_axis < 0 or not _whole(sel, size):
            return False
        v = out_axis - shift
        if v < 0 or value.shape[v] == 1 or value.stride(v) == 0:
            return True
        return layout is not None and self.uniform_operand(value, v, layout)
