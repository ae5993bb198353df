"""Op rules for writes into part of a tensor: ``dst[index] = value`` and
``dst[index].copy_(value)``, the way a fresh tensor is filled piece by piece (torchvision's
multi-scale RoI pooling, one pyramid level at a time; DeepSeek's multi-head latent attention,
each head's own key channels beside a rotary part shared by every head).

A mixin of :class:`~secateur.graph._ops.OpRules`, which provides ``table``, ``info``, ``set``,
``unify``, ``uniform_operand``, ``params``, ``param_mixes`` and ``param_cats``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._shapes import index_axes

_SHARED = "written into part of an axis of another tensor"


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

    def write_slice(self, dst: torch.Tensor, key: Any, view: torch.Tensor, value: Any) -> None:
        """``dst[key].copy_(value)``, with ``key`` basic indexing and ``view`` the slice
        ``dst[key]`` made. Where the slice spans a channel axis of ``value`` whole, dst takes
        those channels there (DeepSeek's MLA copies its per-head keys into a fresh tensor);
        a value's channels written into part of an axis stay whole. Dst keeps its own
        channels only when the slice spans them whole and the value holds one value for all
        of them there (a rotary key broadcast to every head, a constant): anything else
        written there would not lose the channels dst loses, so they stay whole."""
        axes = basic_selectors(dst.shape, key)
        ivalue = self.info(value)
        if axes is None or not isinstance(value, torch.Tensor) or value.dim() > view.dim():
            for info in (ivalue, self.info(dst)):
                if info is not None:
                    self.table.block_layout(info[0], _SHARED)
            return
        shift = view.dim() - value.dim()  # value broadcasts to the slice from the right
        at = {o + (-shift if o >= 0 else 0): a for a, (o, _) in enumerate(axes) if o >= 0}
        if ivalue is not None:
            layout, vdim = ivalue
            a = at.get(vdim)
            spans = a is not None and _whole(axes[a][1], dst.shape[a])
            if spans and value.shape[vdim] == dst.shape[a]:
                idst = self.info(dst)
                if idst is None:
                    self.set(dst, layout, a)
                    return
                if idst[1] == a and (joined := self.unify(idst[0], layout)) is not None:
                    self.set(dst, joined, a)
                    return
            self.table.block_layout(layout, _SHARED)
        if (idst := self.info(dst)) is None:
            return
        layout, a = idst
        v = axes[a][0] - shift if axes[a][0] >= 0 else -1
        one_value = _whole(axes[a][1], dst.shape[a]) and (
            v < 0
            or value.shape[v] == 1
            or value.stride(v) == 0
            or self.uniform_operand(value, v, layout)
        )
        if not one_value:
            self.table.block_layout(layout, _SHARED)
