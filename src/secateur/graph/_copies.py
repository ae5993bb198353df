"""Axes along which a tensor holds copies of one value: Mamba2's ``B`` and ``C``, one group's
state repeated over every head of the group (``B.repeat_interleave(heads, dim=2)`` from an axis
of one entry).

Such a tensor, met with channels along that axis, holds nothing that tells one channel from
another there, whatever channels of its own it carries along another axis: the channels on the
copied axis may go, and its own stay whole. A repeat count that does not follow the pruning
(a number spelled in the code) breaks the pruned model, and the pruning's forward check refuses
that group. :class:`CopiedAxes` follows copies from a repeat of an axis of one entry
(``repeat_interleave``, ``expand``) through ops that keep them: ops on each element alone,
broadcasting ops, a pad of other axes, reshapes and permutes that keep the axis intact, and
einsum letters. It forgets every tensor whose memory an in-place op (or ``out=``) writes into.
"""

from __future__ import annotations

from typing import Any

import torch

from ._einsum import einsum_letters
from ._ops import ELEMENTWISE, POINTWISE, RESHAPE
from ._shapes import PERMUTE, dim_arg, follow_axis, intact_axis, permute_order
from ._uniform import MarkedTensors, written

# ops in POINTWISE that mix neighbouring entries, or change an axis's size or order
_NOT_PER_ELEMENT = {
    name
    for name in POINTWISE
    if "pool" in name or "dropout" in name or "sample" in name or "shuffle" in name
} | {"interpolate", "pad"}
PER_ELEMENT = (POINTWISE | ELEMENTWISE) - _NOT_PER_ELEMENT


class CopiedAxes(MarkedTensors):
    """See the module docstring. Marks: {axis: True}."""

    def along(self, t: Any, axis: int) -> bool:
        """Whether ``t`` holds one value all along ``axis``."""
        return isinstance(t, torch.Tensor) and axis in self._axes.get(id(t), {})

    def follow(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Forget what an op writes into; record the axes of copies of what it makes."""
        wrote = written(name, args, kwargs)
        self.forget(wrote)
        if not wrote and isinstance(out, torch.Tensor) and out.dim() > 0:
            self._mark(out, dict.fromkeys(self._made(name, args, kwargs, out), True))

    def _made(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> set[int]:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        own = self._axes.get(id(x), {}) if x is not None else {}
        if name == "repeat_interleave" and x is not None:
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
            axis = dim_arg(args, kwargs, 2)
            if not isinstance(repeats, int) or axis is None or x.dim() != out.dim():
                return set()
            axis = int(axis) % x.dim()
            return {a for a in own if a != axis} | ({axis} if x.shape[axis] == 1 else set())
        if name in ("expand", "broadcast_to") and x is not None:
            off = out.dim() - x.dim()
            spread = {a + off for a in range(x.dim()) if x.shape[a] == 1 != out.shape[a + off]}
            return spread | {a + off for a in own}
        if name in PER_ELEMENT:
            return self._broadcast(args, kwargs, out)
        if name == "einsum":
            return self._einsum(args, out)
        if not own:
            return set()
        if name == "pad" and x.dim() == out.dim():
            return {a for a in own if x.shape[a] == out.shape[a]}
        if name in PERMUTE:
            order = permute_order(x.dim(), name, args, kwargs)
            return {order.index(a) for a in own} if order else set()
        if name in RESHAPE or name in ("view_as", "reshape_as"):
            moved = set()
            for a in own:
                to = follow_axis(x.shape, out.shape, a)
                moved.add(intact_axis(x.shape, out.shape, a) if to is None else to)
            return moved - {None}
        return set()

    def _broadcast(self, args: tuple, kwargs: dict, out: torch.Tensor) -> set[int]:
        """Output axes where every operand has one entry or copies of the same size, and one
        operand has copies."""
        given = [*args, *(v for k, v in kwargs.items() if k != "out")]
        operands = [t for t in given if isinstance(t, torch.Tensor) and t.dim() > 0]
        axes = set()
        for a in range(out.dim()):
            spans = [(t, a - (out.dim() - t.dim())) for t in operands]
            spans = [(t, at) for t, at in spans if at >= 0 and t.shape[at] != 1]
            if spans and all(t.shape[at] == out.shape[a] and self.along(t, at) for t, at in spans):
                axes.add(a)
        return axes

    def _einsum(self, args: tuple, out: torch.Tensor) -> set[int]:
        """Output letters every operand spelling them (once) holds copies along."""
        equation, operands = (args[0], args[1:]) if args else (None, ())
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(equation, str) or not all(isinstance(t, torch.Tensor) for t in operands):
            return set()
        parsed = einsum_letters(equation, [t.dim() for t in operands])
        if parsed is None or len(parsed[1]) != out.dim():
            return set()
        letters, result = parsed
        axes = set()
        for a, letter in enumerate(result):
            if any(s.count(letter) > 1 for s in letters):
                continue  # a diagonal: not the values along one axis
            spans = [
                (t, s.index(letter)) for t, s in zip(operands, letters, strict=True) if letter in s
            ]
            spans = [(t, i) for t, i in spans if t.shape[i] != 1]
            if spans and all(self.along(t, i) for t, i in spans):
                axes.add(a)
        return axes
