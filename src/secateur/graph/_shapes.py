"""Pure shape arithmetic the tracer uses to follow one axis through reshapes and indexing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def follow_axis(src: Sequence[int], dst: Sequence[int], d: int) -> int | None:
    """Where axis ``d`` of shape ``src`` lands in ``dst`` when only size-1 axes were added or
    removed (view, unsqueeze, squeeze) or leading/size-1 axes were broadcast (expand).
    None when the mapping is not certain."""
    src, dst = tuple(src), tuple(dst)
    if src == dst:
        return d
    if src[d] != 1:
        src_nz = [i for i, s in enumerate(src) if s != 1]
        dst_nz = [j for j, s in enumerate(dst) if s != 1]
        if [src[i] for i in src_nz] == [dst[j] for j in dst_nz]:
            return dst_nz[src_nz.index(d)]
    off = len(dst) - len(src)
    fits = off >= 0 and all(s in (1, dst[i + off]) for i, s in enumerate(src))
    if fits and dst[d + off] == src[d]:
        return d + off
    return None


class ShapeOnly:
    """A stand-in carrying only a shape, for rules that read ``x.shape`` and ``x.dim()``."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)

    def dim(self) -> int:
        return len(self.shape)


def drop_ones(shape: Sequence[int], d: int) -> tuple[tuple[int, ...], int] | None:
    """``shape`` without its size-1 axes other than ``d``, and where ``d`` lands; None when there
    are none to drop. A reshape of a tensor equals the same reshape of it squeezed."""
    keep = [i for i, s in enumerate(shape) if s != 1 or i == d]
    if len(keep) == len(shape):
        return None
    return tuple(shape[i] for i in keep), keep.index(d)


def intact_axis(src: Sequence[int], dst: Sequence[int], d: int) -> int | None:
    """Axis of a reshape's result that carries axis ``d`` of ``src`` unchanged: same size and
    the same number of elements after it, so every element keeps its index along it."""
    inner = math.prod(src[d + 1 :])
    for j, size in enumerate(dst):
        if size == src[d] and math.prod(dst[j + 1 :]) == inner:
            return j
    return None


def common_refinement(src: Sequence[int], dst: Sequence[int]) -> tuple[int, ...] | None:
    """The shape both ``src`` and ``dst`` are merges of, when each axis divides cleanly
    (``(64, 8)`` and ``(2, 8, 32)`` both merge ``(2, 8, 4, 8)``); None when sizes do not divide
    or an axis has one entry or none."""
    if {0, 1} & {*src, *dst} or math.prod(src) != math.prod(dst):
        return None
    out: list[int] = []
    i = j = 0
    x, y = (src[0], dst[0]) if src and dst else (0, 0)
    while i < len(src) and j < len(dst):
        step = min(x, y)
        if max(x, y) % step:
            return None
        out.append(step)
        x, y = x // step, y // step
        if x == 1:
            i += 1
            x = src[i] if i < len(src) else 0
        if y == 1:
            j += 1
            y = dst[j] if j < len(dst) else 0
    return tuple(out)


def merge_run(src: Sequence[int], dst: Sequence[int]) -> tuple[int, int] | None:
    """``(a, b)`` when ``dst`` is ``src`` with axes ``a .. b-1`` merged into one axis ``a``."""
    if len(dst) >= len(src):
        return None
    a = 0
    while a < len(dst) and src[a] == dst[a]:
        a += 1
    b = len(src) - (len(dst) - a - 1)
    if a >= len(dst) or tuple(src[b:]) != tuple(dst[a + 1 :]):
        return None
    return (a, b) if math.prod(src[a:b]) == dst[a] else None


def index_axes(shape: Sequence[int], index: Any) -> list[tuple[int, Any]] | None:
    """For a ``tensor[index]``: per input axis, ``(output axis or -1 if removed, selector)``.

    Selectors are ``slice`` objects, ints, one list of ints (Falcon's ``qkv[:, :, :, [-2]]``:
    a single advanced index keeps its axis in place), or one integer tensor, whose axes
    take the indexed axis's place (TinyViT's ``attention_biases[:, idxs]`` with ``idxs`` of
    shape (N, N)), given as ``("tensor", its number of axes)``. None for other advanced
    indexing (bools, several lists or tensors, or one beside an int, which moves the axes to
    the front).
    """
    items = list(index) if isinstance(index, tuple) else [index]
    lists = [i for i in items if isinstance(i, list)]
    tensors = [i for i in items if isinstance(i, torch.Tensor)]
    ints = any(isinstance(i, int) and not isinstance(i, bool) for i in items)
    if lists:
        plain = all(isinstance(v, int) and not isinstance(v, bool) for v in lists[0])
        if len(lists) > 1 or ints or tensors or not plain:
            return None
    if tensors:
        t = tensors[0]
        if len(tensors) > 1 or ints or t.is_floating_point() or t.dtype == torch.bool:
            return None
    explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list[tuple[int, Any]] = []
    out_axis = 0
    for item in items:
        if item is Ellipsis:
            for _ in range(len(shape) - explicit):
                out.append((out_axis, slice(None)))
                out_axis += 1
        elif item is None:
            out_axis += 1
        elif isinstance(item, list):
            out.append((out_axis, item))
            out_axis += 1
        elif isinstance(item, torch.Tensor):
            out.append((out_axis if item.dim() else -1, ("tensor", item.dim())))
            out_axis += item.dim()
        elif isinstance(item, bool) or not isinstance(item, (int, slice)):
            return None
        elif isinstance(item, int):
            out.append((-1, item))
        else:
            out.append((out_axis, item))
            out_axis += 1
    while len(out) < len(shape):
        out.append((out_axis, slice(None)))
        out_axis += 1
    return out if len(out) == len(shape) else None


def dim_arg(args: tuple, kwargs: dict, pos: int, default: Any = None) -> Any:
    """An op's ``dim`` argument: by keyword, else at position ``pos``, else ``default``."""
    return kwargs.get("dim", args[pos] if len(args) > pos else default)


PERMUTE = {"permute", "transpose", "swapaxes"}


def permute_order(ndim: int, name: str, args: tuple, kwargs: dict) -> list[int] | None:
    """The input axis behind each output axis of ``permute``/``transpose``/``swapaxes``."""
    if name == "permute":
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return [int(o) % ndim for o in kwargs.get("dims", order)]
    pair = list(args[1:3]) or [kwargs.get("dim0"), kwargs.get("dim1")]
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        return None
    a, b = (v % ndim for v in pair)
    order = list(range(ndim))
    order[a], order[b] = b, a
    return order


def regrouped_lead(
    shape: Sequence[int], out: Sequence[int], d: int
) -> tuple[tuple[int, ...], int] | None:
    """A reshape that regroups the axes before axis ``d``'s run while it also splits or merges
    that run (Twins' ``reshape(B, _h * _w, ws * ws, 3, heads, hd)`` of ``(B, _h, _w, ws, ws,
    3C)``): the shape after regrouping only the leading axes as ``out``'s, and where ``d``
    lands there, for the other reshape rules to follow the tail from. None when no cut
    before ``d`` leaves equal products on both sides, or when the leading axes already
    agree."""
    shape, out = tuple(shape), tuple(out)
    for cut in range(d, 0, -1):
        lead = math.prod(shape[:cut])
        for k in range(1, len(out)):
            if math.prod(out[:k]) == lead and math.prod(out[k:]) == math.prod(shape[cut:]):
                if out[:k] == shape[:cut]:
                    return None
                return out[:k] + shape[cut:], k + d - cut
    return None


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
