"""Untracked tensors whose values are the same all along some axes (T5's cross-attention bias:
``torch.zeros((1, n_heads, q, k))``, then a mask that broadcasts over the heads).

Such a tensor, met with a value per channel (per head), holds nothing that tells one channel
from another: it may lose channels with them, as long as the code that makes it spells the new
width. :class:`UniformTensors` follows them from ``zeros``/``ones``/``full`` (and
``x.new_zeros``/``new_ones``/``new_full``, which read only x's dtype and device) through
elementwise ops, remembering for each axis which call made its values, and forgets every
tensor whose memory an in-place op (or ``out=``) writes into, through any view or alias.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ._ops import ELEMENTWISE, POINTWISE
from ._shapes import basic_selectors

FILLED = {"zeros", "ones", "full", "new_zeros", "new_ones", "new_full"}
_CASTS = {"to", "float", "half", "bfloat16"}
# maps of each value on its own: a value the same all along an axis stays so
_VALUE_MAPS = POINTWISE - {
    *("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d"),
    *("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool2d"),
    *("avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "interpolate", "upsample", "pad"),
    *("pixel_unshuffle", "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d"),
    *("alpha_dropout", "feature_alpha_dropout"),
}
KEEPING = ELEMENTWISE | _VALUE_MAPS | _CASTS | {"contiguous", "clone", "detach"}
_IN_PLACE_DUNDERS = {
    *("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__"),
    *("__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"),
}


@dataclass(frozen=True)
class Made:
    """The call that made a uniform tensor: its number, its output's number of axes, its
    arguments and where it ran (for the width it spells)."""

    serial: int
    ndim: int
    args: tuple
    context: tuple | None


def made_sizes(name: str, args: tuple, kwargs: dict) -> tuple:
    """The shape arguments of a call that makes a tensor (``zeros(2, n)``, ``x.new_full((2, n),
    v)``, ``empty(size=...)``): without ``x`` or the fill value."""
    if kwargs.get("size") is not None:
        return (kwargs["size"],)
    sizes = args[1:] if name.startswith("new_") else args
    return sizes[:1] if name.endswith("full") else sizes


def _count_free(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the values a ``zeros``/``ones``/``full`` call fills in are not likely a width:
    ``full``'s fill value is 0, 1 or -1, a bool, not finite or of magnitude 1e4 and more (a
    mask's). A fill such as ``float(self.n_heads)`` would change as pruning rewrites the count,
    so such a tensor is not followed as uniform. A count used as a value some other way
    (``ones * self.n_heads``, ``attn / self.n_heads``) is not seen: the general limit of
    rewriting widths, which reads only shapes."""
    if not name.endswith("full"):
        return True
    at = 2 if name.startswith("new_") else 1
    value = kwargs["fill_value"] if "fill_value" in kwargs else args[at] if len(args) > at else None
    if isinstance(value, bool):
        return True
    if not isinstance(value, (int, float)):
        return False  # a tensor of values, or none given: they may come from anything
    return value in (0, 1, -1) or not math.isfinite(value) or abs(value) >= 1e4


def written(name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op writes into: its first argument when in place, and ``out=``."""
    out = [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
    in_place = (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
    # ``F.relu(t, inplace=True)``, ``F.dropout(t, 0.1, False, True)``: named without the "_"
    in_place = in_place or kwargs.get("inplace") is True
    in_place = in_place or (name in POINTWISE and len(args) > 1 and args[-1] is True)
    if in_place and args and isinstance(args[0], torch.Tensor):
        out.append(args[0])
    return out


def storage_key(t: torch.Tensor) -> int | None:
    """The identity of ``t``'s memory, shared by its views; None where it has no plain one."""
    try:
        return t.untyped_storage()._cdata
    except Exception:  # a tensor without a plain storage: no alias can be ruled out
        return None


class MarkedTensors:
    """Marks on tensors, by identity, forgotten when anything writes into their memory."""

    def __init__(self) -> None:
        self._axes: dict[int, dict[int, Any]] = {}  # id -> {axis: what marked it}
        self._storages: dict[int, set[int]] = {}  # storage -> ids of the tensors on it
        self._keep: dict[int, torch.Tensor] = {}  # ids and storages stay unique while tracing

    def forget(self, tensors: list[torch.Tensor]) -> None:
        """Unmark every tensor sharing memory with one of ``tensors``."""
        for t in tensors:
            key = storage_key(t)
            if key is None:  # unknown memory: nothing marked can be trusted
                self._axes.clear()
                self._storages.clear()
                return
            for marked in self._storages.pop(key, ()):
                self._axes.pop(marked, None)

    def on(self, key: int | None) -> list[torch.Tensor]:
        """The marked tensors on the memory ``key`` (:func:`storage_key`)."""
        return [self._keep[i] for i in self._storages.get(key, ()) if key is not None]  # type: ignore[arg-type]

    def _mark(self, out: Any, axes: dict[int, Any]) -> None:
        key = storage_key(out) if axes else None
        if key is not None:
            self._keep[id(out)] = out
            self._axes[id(out)] = axes
            self._storages.setdefault(key, set()).add(id(out))


class UniformTensors(MarkedTensors):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()  # marks: {axis from the end: the call that made it}
        self._serial = 0

    def along(self, t: torch.Tensor, axis: int) -> Made | None:
        """The call that made ``t``'s values along ``axis``, if they are the same all along it."""
        entry = self._axes.get(id(t))
        return entry.get(axis - t.dim()) if entry is not None else None

    def _sliced(self, t: torch.Tensor, key: Any, out: torch.Tensor) -> dict[int, Made | None]:
        """``t[key]`` with ``key`` slices only, after leading ints (``buf[:, :, :n]``,
        ``buf[i, :c]``): the axes a slice keeps whole hold the same values as in ``t``; an axis
        cut shorter keeps no mark (its width is no longer the one it was made with). An int
        after a slice (``buf[:, -1]``) marks nothing: marks count axes from the end, so the
        axes before it would stand for the one it drops, whose width the pick reads."""
        axes = basic_selectors(t.shape, key)
        if axes is None:
            return {}
        dropped = [a for a, (o, _) in enumerate(axes) if o < 0]
        if dropped and max(dropped) >= len(dropped):  # not all leading
            return {}
        marks = self._axes[id(t)]
        kept = {}
        for a, (o, sel) in enumerate(axes):
            mark = marks.get(a - t.dim())
            if o >= 0 and type(sel) is slice and out.shape[o] == t.shape[a] and mark is not None:
                kept[o - out.dim()] = mark
        return kept

    def marks_in(self, values: Any) -> list[tuple[torch.Tensor, dict[int, Made]]]:
        """The marked tensors among ``values`` with their marks, as they are now."""
        return [
            (t, {k: m for k, m in self._axes[id(t)].items() if m is not None})
            for t in tree_flatten(values)[0]
            if isinstance(t, torch.Tensor) and id(t) in self._axes
        ]

    def carried(self, out: Any, axis: int, made: Made) -> bool:
        """Whether ``out`` holds ``made``'s values along ``axis`` (from the end)."""
        entry = self._axes.get(id(out)) if isinstance(out, torch.Tensor) else None
        mark = entry.get(axis) if entry is not None else None
        return mark is not None and mark.serial == made.serial

    def follow(
        self,
        name: str,
        args: tuple,
        kwargs: dict,
        out: Any,
        context: Callable[[], tuple | None],
    ) -> None:
        """Record what an op on untracked tensors makes, then forget what it wrote into."""
        axes = self._made(name, args, kwargs, out, context)
        self.forget(written(name, args, kwargs))
        self._mark(out, axes)

    def _made(self, name, args, kwargs, out, context) -> dict[int, Made | None]:  # noqa: ANN001
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return {}
        if name in FILLED and not _count_free(name, args, kwargs):
            return {}
        if name in FILLED:
            self._serial += 1
            made = Made(self._serial, out.dim(), made_sizes(name, args, kwargs), context())
            return {-k: made for k in range(1, out.dim() + 1)}
        if name == "__getitem__" and len(args) == 2 and id(args[0]) in self._axes:
            return self._sliced(args[0], args[1], out)
        if name not in KEEPING:
            return {}
        sources = [a for a in tree_flatten([args, kwargs])[0] if isinstance(a, torch.Tensor)]
        if not any(id(t) in self._axes for t in sources):
            return {}
        axes: dict[int, Made | None] = {}
        for k in range(1, out.dim() + 1):
            if all(
                t.dim() < k or t.shape[-k] == 1 or -k in self._axes.get(id(t), {}) for t in sources
            ):
                # the values along it were made by the operand that spans it whole
                spans = [t for t in sources if t.dim() >= k and t.shape[-k] == out.shape[-k]]
                axes[-k] = next(
                    (self._axes[id(t)].get(-k) for t in spans if id(t) in self._axes), None
                )
        return axes
