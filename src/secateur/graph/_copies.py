"""Axes along which a tensor holds copies of one value: Mamba2's ``B`` and ``C``, one group's
state repeated over every head of the group (``B.repeat_interleave(heads, dim=2)`` from an axis
of one entry).

Such a tensor, met with channels along that axis, holds nothing that tells one channel from
another there, whatever channels of its own it carries along another axis: the channels on the
copied axis may go, and its own stay whole, once the width the copies were made with is noted
where they were made. :class:`CopiedAxes` follows copies from a repeat of an axis of one entry
(``repeat_interleave``, ``expand``) through ops that keep them: ops on each element alone,
broadcasting ops, a pad of other axes, reshapes and permutes that keep the axis intact, and
einsum letters. It forgets every tensor whose memory an in-place op (or ``out=``) writes into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Repeat:
    """The call that made copies along an axis: its arguments and where it ran (for the
    width it spells)."""

    args: tuple
    context: tuple | None


class CopiedAxes(MarkedTensors):
    """See the module docstring. Marks: {axis: the call that made the copies}."""

    def along(self, t: Any, axis: int) -> Repeat | None:
        """The call that made ``t`` hold one value all along ``axis``, if it does."""
        return self._axes.get(id(t), {}).get(axis) if isinstance(t, torch.Tensor) else None

    def follow(
        self, name: str, args: tuple, kwargs: dict, out: Any, context: Callable[[], tuple | None]
    ) -> None:
        """Forget what an op writes into; record the axes of copies of what it makes."""
        wrote = written(name, args, kwargs)
        self.forget(wrote)
        if not wrote and isinstance(out, torch.Tensor) and out.dim() > 0:
            self._mark(out, self._made(name, args, kwargs, out, context))

    def _made(self, name, args, kwargs, out, context) -> dict[int, Repeat]:  # noqa: ANN001
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        own = self._axes.get(id(x), {}) if x is not None else {}
        if name == "repeat_interleave" and x is not None:
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
            axis = dim_arg(args, kwargs, 2)
            if not isinstance(repeats, int) or axis is None or x.dim() != out.dim():
                return {}
            axis = int(axis) % x.dim()
            kept = {a: r for a, r in own.items() if a != axis}
            if x.shape[axis] == 1:
                kept[axis] = Repeat((repeats, kwargs.get("output_size")), context())
            return kept
        if name in ("expand", "broadcast_to") and x is not None:
            off = out.dim() - x.dim()
            made = {a + off: r for a, r in own.items()}
            spread = [a for a in range(x.dim()) if x.shape[a] == 1 != out.shape[a + off]]
            if spread:
                repeat = Repeat(args[1:], context())
                made.update({a + off: repeat for a in spread})
            return made
        if name in PER_ELEMENT:
            return self._broadcast(args, kwargs, out)
        if name == "einsum":
            return self._einsum(args, out)
        if not own:
            return {}
        if name == "pad" and x.dim() == out.dim():
            return {a: r for a, r in own.items() if x.shape[a] == out.shape[a]}
        if name in PERMUTE:
            order = permute_order(x.dim(), name, args, kwargs)
            return {order.index(a): r for a, r in own.items()} if order else {}
        if name in RESHAPE or name in ("view_as", "reshape_as"):
            moved = {}
            for a, r in own.items():
                to = follow_axis(x.shape, out.shape, a)
                to = intact_axis(x.shape, out.shape, a) if to is None else to
                if to is not None:
                    moved[to] = r
            return moved
        return {}

    def _broadcast(self, args: tuple, kwargs: dict, out: torch.Tensor) -> dict[int, Repeat]:
        """Output axes where every operand has one entry or copies of the same size."""
        given = [*args, *(v for k, v in kwargs.items() if k != "out")]
        operands = [t for t in given if isinstance(t, torch.Tensor) and t.dim() > 0]
        axes = {}
        for a in range(out.dim()):
            made = None
            for t in operands:
                at = a - (out.dim() - t.dim())
                if at < 0 or t.shape[at] == 1:
                    continue
                made = self.along(t, at) if t.shape[at] == out.shape[a] else None
                if made is None:
                    break
            else:
                if made is not None:
                    axes[a] = made
        return axes

    def _einsum(self, args: tuple, out: torch.Tensor) -> dict[int, Repeat]:
        """Output letters every operand spelling them (once) holds copies along."""
        equation, operands = (args[0], args[1:]) if args else (None, ())
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(equation, str) or not all(isinstance(t, torch.Tensor) for t in operands):
            return {}
        parsed = einsum_letters(equation, [t.dim() for t in operands])
        if parsed is None or len(parsed[1]) != out.dim():
            return {}
        letters, result = parsed
        axes = {}
        for a, letter in enumerate(result):
            if any(s.count(letter) > 1 for s in letters):
                continue  # a diagonal: not the values along one axis
            made = [
                self.along(t, s.index(letter))
                for t, s in zip(operands, letters, strict=True)
                if letter in s and t.shape[s.index(letter)] != 1
            ]
            if made and all(m is not None for m in made):
                axes[a] = made[0]
        return axes
