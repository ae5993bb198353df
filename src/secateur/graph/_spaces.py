"""Channel spaces and their coupling (union-find), the vocabulary of the dependency graph.

A *space* is a set of channel indices born at one place: a layer's output features, or a model
input. Ops that force two tensors to share channel indices (a residual add, a BatchNorm, a
depthwise conv) *unite* their spaces. A tensor's feature axis is a *layout*: a tuple of segments
``(space, factor)`` laid end to end, where feature ``j`` of a segment at offset ``o`` belongs to
channel ``(j - o) // factor`` of the space. ``factor > 1`` comes from flattening channels over
spatial positions; several segments come from a concat along the feature axis.

Two more relations keep the table exact without ever splitting a union:

- *refine*: a split or slice cuts a space into consecutive pieces (GPT-2's fused q|k|v
  projection); each piece is a space of its own, and members of the whole are spread over them.
- *coarsen*: a view that splits features into ``(heads, head_dim)`` makes the unit of the space
  a whole head; members of the fine space move to the coarse one with ``factor * by``.

:meth:`SpaceTable.resolve` follows both relations down to the final prunable spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    space: int
    factor: int = 1


Layout = tuple[Segment, ...]


@dataclass(frozen=True)
class Member:
    """One module's stake in a space: ``role`` says which tensors and dims it slices.

    Producers (``conv_out``, ``linear_out``, ``convT_out``, ``norm``, ``depthwise``,
    ``embedding``, ...) write the channels; consumers (``conv_in``, ``linear_in``, ...) read
    them at feature ``offset + i * factor + k`` for ``k < factor``. Role ``param`` slices the
    module's own tensor ``tensor`` along ``dim`` (a free parameter such as an RMSNorm weight).
    """

    module_name: str
    role: str
    offset: int = 0
    factor: int = 1
    tensor: str = ""
    dim: int = 0


@dataclass
class SpaceTable:
    """Union-find over spaces, with sizes, members, flags and reasons a space may not be pruned."""

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    members: list[list[Member]] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)
    flags: dict[int, set[str]] = field(default_factory=dict)
    coarse: dict[int, tuple[int, int]] = field(default_factory=dict)  # root -> (space, by)
    refined: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # root -> pieces

    def new(self, size: int, *, blocked: str | None = None) -> int:
        idx = len(self.sizes)
        self.sizes.append(size)
        self.parent.append(idx)
        self.members.append([])
        if blocked:
            self.blocked[idx] = blocked
        return idx

    def find(self, idx: int) -> int:
        while self.parent[idx] != idx:
            self.parent[idx] = self.parent[self.parent[idx]]
            idx = self.parent[idx]
        return idx

    def unite(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.sizes[ra] != self.sizes[rb]:
            reason = f"spaces of {self.sizes[ra]} and {self.sizes[rb]} channels met"
            self.block(ra, reason)
            self.block(rb, reason)
            self.parent[rb] = ra
            return ra
        if ra in self.refined or rb in self.refined:
            cuts = self._cuts(ra) | self._cuts(rb)
            pieces_a, pieces_b = self.refine(ra, cuts), self.refine(rb, cuts)
            self.parent[rb] = ra
            self.refined.pop(rb, None)
            for (pa, _, _), (pb, _, _) in zip(pieces_a, pieces_b, strict=True):
                self.unite(pa, pb)
        else:
            self.parent[rb] = ra
        if rb in self.coarse:
            cb, by_b = self.coarse.pop(rb)
            if ra in self.coarse:
                ca, by_a = self.coarse[ra]
                if by_a == by_b:
                    self.unite(ca, cb)
                else:
                    self.block(ra, f"heads of {by_a} and {by_b} channels met")
            else:
                self.coarse[ra] = (cb, by_b)
        self._check_exclusive(self.find(ra))
        return self.find(ra)

    def block(self, idx: int, reason: str) -> None:
        self.blocked.setdefault(idx, reason)

    def flag(self, idx: int, name: str) -> None:
        self.flags.setdefault(idx, set()).add(name)

    def block_layout(self, layout: Layout, reason: str) -> None:
        for seg in layout:
            self.block(seg.space, reason)

    def add_member(self, layout: Layout, module_name: str, role: str, **extra: object) -> None:
        offset = 0
        for seg in layout:
            self.members[seg.space].append(
                Member(module_name, role, offset, seg.factor, **extra)  # type: ignore[arg-type]
            )
            offset += self.sizes[seg.space] * seg.factor

    # -- refine and coarsen ------------------------------------------------------------------
    def coarsen(self, idx: int, by: int) -> int:
        """The space whose unit ``i`` is units ``i*by .. i*by+by-1`` of ``idx``'s space."""
        root = self.find(idx)
        if by == 1:
            return root
        if self.sizes[root] % by:
            self.block(root, f"{self.sizes[root]} channels do not split into units of {by}")
            return self.new(max(1, self.sizes[root] // by), blocked="uneven heads")
        if root in self.coarse:
            space, have = self.coarse[root]
            if have == by:
                return self.find(space)
            if by % have == 0:
                return self.coarsen(space, by // have)
            if have % by == 0:
                finer = self.new(self.sizes[root] // by)
                self.coarse[root] = (finer, by)
                self.coarse[finer] = (space, have // by)
                return finer
            self.block(root, f"units of {have} and {by} channels met")
            return self.new(self.sizes[root] // by, blocked="mismatched heads")
        space = self.new(self.sizes[root] // by)
        self.coarse[root] = (space, by)
        self._check_exclusive(root)
        return space

    def refine(self, idx: int, cuts: set[int]) -> list[tuple[int, int, int]]:
        """Cut ``idx``'s space at unit boundaries ``cuts``; return its leaf pieces in order as
        ``(space, start unit, size)``. Cutting again only ever adds boundaries."""
        root = self.find(idx)
        size = self.sizes[root]
        cuts = {c for c in cuts if 0 < c < size}
        if root not in self.refined:
            if not cuts:
                return [(root, 0, size)]
            bounds = [0, *sorted(cuts), size]
            self.refined[root] = tuple(
                (self.new(hi - lo), lo) for lo, hi in zip(bounds, bounds[1:], strict=False)
            )
            if root in self.blocked:
                for piece, _ in self.refined[root]:
                    self.block(piece, self.blocked[root])
            self._check_exclusive(root)
        pieces = []
        for piece, start in self.refined[root]:
            inner = {c - start for c in cuts if start < c < start + self.sizes[self.find(piece)]}
            for space, lo, n in self.refine(piece, inner):
                pieces.append((space, start + lo, n))
        return pieces

    def _cuts(self, root: int) -> set[int]:
        return {start for _, start, _ in self.refine(root, set())}

    def _check_exclusive(self, root: int) -> None:
        if root in self.refined and root in self.coarse:
            self.block(root, "a space both split into parts and grouped into heads")

    # -- resolution --------------------------------------------------------------------------
    def resolve(self, idx: int, offset: int = 0, factor: int = 1) -> list[tuple[int, int, int]]:
        """Final spaces that ``idx``'s units belong to, as ``(root, offset, factor)`` triples
        for a member that sits at ``offset`` with ``factor`` on ``idx``."""
        root = self.find(idx)
        if root in self.refined and root not in self.coarse:
            out = []
            for piece, start in self.refined[root]:
                out += self.resolve(piece, offset + start * factor, factor)
            return out
        if root in self.coarse and root not in self.refined:
            space, by = self.coarse[root]
            return self.resolve(space, offset, factor * by)
        return [(root, offset, factor)]
