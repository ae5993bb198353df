"""Op rule for a channel shuffle: ShuffleNet's ``view(b, g, c // g, h, w)``, then
``transpose(1, 2)``, then ``view(b, c, h, w)``, which deals the channels of ``g`` equal blocks
out in turn (output channel ``j * g + i`` is channel ``j`` of block ``i``).

A view that splits a channel axis other than the last into ``(groups, per group)`` waits for the
op that reads it. A transpose of exactly those two axes makes it a shuffle: a pruned tensor can
only be dealt out alike if every block loses the same positions, so the blocks' layouts are
united position by position, and the later view that merges ``(per group, groups)`` back makes
each unit span ``groups`` consecutive channels. Any other reader settles the view as any other
split of the channels (each group a unit).

A mixin of :class:`~secateur.graph._ops.OpRules`, which provides ``table``, ``deferred``,
``layouts``, ``set``, ``fresh``, ``unify``, ``split_layout``, ``_split`` and ``note_literals``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._attention_rules import PendingView
from ._shapes import PERMUTE, ShapeOnly, permute_order
from ._spaces import Layout


@dataclass(frozen=True)
class GroupedView(PendingView):
    """A view of the channel axis ``axis`` (not the last) into ``(groups, per group)``."""


def grouped_split(x_shape: tuple[int, ...], dim: int, out_shape: tuple[int, ...]) -> bool:
    """Whether a view of ``x_shape`` to ``out_shape`` splits the channel axis ``dim``, not the
    last, into two axes of more than one entry each."""
    a = dim
    return (
        a < len(x_shape) - 1
        and len(out_shape) == len(x_shape) + 1
        and out_shape[:a] == x_shape[:a]
        and out_shape[a + 2 :] == x_shape[a + 1 :]
        and out_shape[a] > 1
        and out_shape[a + 1] > 1
    )


class ShuffleRules:
    """Rules for grouped views of the channels; see the module docstring."""

    def settle_grouped(self, t: torch.Tensor, view: GroupedView) -> None:
        """The default reading: each group of channels is a unit."""
        a = view.axis
        unsplit = ShapeOnly(view.out_shape)
        if self._split(ShapeOnly(view.x_shape), view.layout, a, unsplit, a, a + 2):
            new, axis = self.layouts.pop(id(unsplit))
            self.set(t, new, axis)
            self.note_literals(view.args, axis, view.out_shape[axis], new, view.context)
        else:
            reason = f"op '{view.name}' has no channel rule"
            self.table.block_layout(view.layout, reason)
            self.fresh(t, a, blocked=reason)

    def read_grouped(self, x, name, args, kwargs, out) -> bool:  # noqa: ANN001
        """A transpose of the two axes of a grouped view: the channel shuffle's reading."""
        view = self.deferred[id(x)]
        a = view.axis
        if name not in PERMUTE or not isinstance(out, torch.Tensor):
            return False
        order = permute_order(x.dim(), name, args, kwargs)
        swapped = list(range(x.dim()))
        swapped[a], swapped[a + 1] = a + 1, a
        if order is None or list(order) != swapped:
            return False
        groups, per = view.out_shape[a], view.out_shape[a + 1]
        pieces = self.split_layout(view.layout, [k * per for k in range(1, groups)])
        if pieces is None or len(pieces) != groups:
            return False
        merged: Layout | None = pieces[0]
        for piece in pieces[1:]:
            merged = self.unify(merged, piece) if merged is not None else None
        if merged is None:
            return False
        self.set(out, merged, a)  # the per-group axis, now where the groups were
        # a per-group width spelled in the view (``view(b, self.groups, self.per, h, w)``)
        self.note_literals(view.args, a + 1, per, merged, view.context)
        return True
