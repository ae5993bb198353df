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
- *interleave*: a grouped conv that shrinks every group alike makes unit ``k`` of the space
  the ``k``-th channel of each of its ``groups`` blocks; members move to the new space with
  ``repeats = groups`` copies ``period`` features apart.

:meth:`SpaceTable.resolve` follows the three relations down to the final prunable spaces.
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
    them at feature ``offset + r * period + i * factor + k`` for ``k < factor`` and
    ``r < repeats`` (``repeats > 1`` when every group of a grouped conv loses the same
    channels). Role ``param`` slices the module's own tensor ``tensor`` along ``dim`` (a free
    parameter such as an RMSNorm weight).
    """

    module_name: str
    role: str
    offset: int = 0
    factor: int = 1
    tensor: str = ""
    dim: int = 0
    repeats: int = 1
    period: int = 0

    @property
    def width(self) -> int:
        """Features one unit covers in this member."""
        return self.factor * self.repeats


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
    strided: dict[int, tuple[int, int]] = field(default_factory=dict)  # root -> (space, groups)

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
        for derived, what in (
            (self.coarse, "heads of {} and {} channels"),
            (self.strided, "grouped convs of {} and {} groups"),
        ):
            if rb in derived:  # the merged space keeps one derived space of each kind
                space_b, k_b = derived.pop(rb)
                if ra not in derived:
                    derived[ra] = (space_b, k_b)
                elif derived[ra][1] == k_b:
                    self.unite(derived[ra][0], space_b)
                else:
                    self.block(ra, what.format(derived[ra][1], k_b) + " met")
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

    def interleave(self, idx: int, groups: int) -> int:
        """The space whose unit ``k`` is unit ``k`` of each of ``idx``'s ``groups`` equal blocks
        (channels ``k + j * size / groups``): a grouped conv that shrinks every group alike."""
        root = self.find(idx)
        if groups == 1:
            return root
        per = self.sizes[root] // groups
        if self.sizes[root] % groups:
            self.block(root, f"{self.sizes[root]} channels do not split into {groups} groups")
            return self.new(max(1, per), blocked="uneven groups")
        if root in self.strided:
            space, have = self.strided[root]
            if have == groups:
                return self.find(space)
            self.block(root, f"grouped convs of {have} and {groups} groups met")
            return self.new(per, blocked="mismatched groups")
        space = self.new(per)
        self.strided[root] = (space, groups)
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
            self._block_below(root, "a space both split into parts and grouped into heads")
        elif root in self.strided and (root in self.refined or root in self.coarse):
            self._block_below(root, "a grouped conv's channels also split or grouped another way")

    def _block_below(self, root: int, reason: str) -> None:
        """Block ``root`` and every space derived from it: its members stay on ``root`` (it
        resolves to itself), so a derived space's group would lack them."""
        self.block(root, reason)
        below = [piece for piece, _ in self.refined.get(root, ())]
        below += [rel[root][0] for rel in (self.coarse, self.strided) if root in rel]
        for space in below:
            self._block_below(self.find(space), reason)

    # -- resolution --------------------------------------------------------------------------
    def unit_widths(self, layout: tuple[Segment, ...]) -> dict[int, int] | None:
        """Features each unit of every final space spans in ``layout``, summed over its
        segments; two layouts with the same keep the same width however units are removed
        (a channel shuffle's input and output). None when nested grouped convs leave no
        single stride."""
        widths: dict[int, int] = {}
        for seg in layout:
            for root, _, factor, repeats, _ in self.resolve(seg.space, 0, seg.factor):
                if repeats == 0:
                    return None
                widths[root] = widths.get(root, 0) + factor * repeats
        return widths

    def resolve(
        self, idx: int, offset: int = 0, factor: int = 1, repeats: int = 1, period: int = 0
    ) -> list[tuple[int, int, int, int, int]]:
        """Final spaces that ``idx``'s units belong to, as ``(root, offset, factor, repeats,
        period)`` for a member that sits at ``offset`` with ``factor`` on ``idx``. Two grouped
        convs nested in one another give ``repeats == 0``: no single stride describes them."""
        root = self.find(idx)
        kinds = (root in self.refined) + (root in self.coarse) + (root in self.strided)
        if kinds == 1 and root in self.refined:
            out = []
            for piece, start in self.refined[root]:
                out += self.resolve(piece, offset + start * factor, factor, repeats, period)
            return out
        if kinds == 1 and root in self.coarse:
            space, by = self.coarse[root]
            return self.resolve(space, offset, factor * by, repeats, period)
        if kinds == 1 and root in self.strided:
            space, groups = self.strided[root]
            per = self.sizes[root] // groups
            if repeats > 1:
                return [(r, o, f, 0, 0) for r, o, f, _, _ in self.resolve(space, offset, factor)]
            return self.resolve(space, offset, factor, groups, per * factor)
        return [(root, offset, factor, repeats, period)]
