"""The channel rule for ``torch.linalg.solve_triangular(A, B)``: a batch of triangular systems
``A X = B`` solved one by one (Gated DeltaNet's chunked delta rule, as in Qwen3-Next and
Qwen3.5, solves one system per head and chunk).

Channels on a batch axis pass to the same axis of the solution when the other operand carries
the same channels there or holds one value along it; channels on B's columns pass when A holds
none (each column is solved alone). Anything else (channels inside A's matrices) blocks them.

A mixin of :class:`~secateur.graph._ops.OpRules`, which provides ``info``, ``set``, ``unify``
and ``_broadcasts``.
"""

from __future__ import annotations

import torch


class LinalgRules:
    """The ``linalg_solve_triangular`` rule; see the module docstring."""

    def solve_triangular(self, args: tuple, kwargs: dict, out: object) -> bool:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("B")
        if not all(isinstance(t, torch.Tensor) for t in (a, b, out)) or a.dim() < 2:
            return False
        if not kwargs.get("left", True) or b.dim() < 2 or out.shape != b.shape:
            return False
        ia, ib = self.info(a), self.info(b)
        batch = out.dim() - 2  # output axes before the matrices'
        placed = []
        for t, info in ((a, ia), (b, ib)):
            if info is None:
                continue
            at = info[1] + out.dim() - t.dim()
            if at < batch:
                placed.append((t, info[0], at))
            elif t is b and ia is None and info[1] == b.dim() - 1:
                placed.append((t, info[0], out.dim() - 1))  # B's columns, each solved alone
            else:
                return False
        axes = {at for _, _, at in placed}
        if len(axes) != 1:
            return False
        axis = axes.pop()
        layout = placed[0][1]
        for _, lt, _ in placed[1:]:
            layout = self.unify(layout, lt)
            if layout is None:
                return False
        if len(placed) == 1 and axis < batch:
            other = b if placed[0][0] is a else a
            if not self._broadcasts(other, axis, out):
                return False
        self.set(out, layout, axis)
        return True
