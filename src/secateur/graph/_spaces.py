"""Channel spaces and their coupling (union-find), the vocabulary of the dependency graph.

A *space* is a set of channel indices born at one place: a layer's output features, or a model
input. Ops that force two tensors to share channel indices (a residual add, a BatchNorm, a
depthwise conv) *unite* their spaces. A tensor's feature axis is a *layout*: a tuple of segments
``(space, factor)`` laid end to end, where feature ``j`` of a segment at offset ``o`` belongs to
channel ``(j - o) // factor`` of the space. ``factor > 1`` comes from flattening channels over
spatial positions; several segments come from a concat along the feature axis.
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
    ``embedding``) write the channels; consumers (``conv_in``, ``linear_in``, ``convT_in``) read
    them at feature ``offset + i * factor + k`` for ``k < factor``.
    """

    module_name: str
    role: str
    offset: int = 0
    factor: int = 1


@dataclass
class SpaceTable:
    """Union-find over spaces, with sizes, members and reasons a space may not be pruned."""

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    members: list[list[Member]] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)

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

    def block(self, idx: int, reason: str) -> None:
        self.blocked.setdefault(idx, reason)

    def block_layout(self, layout: Layout, reason: str) -> None:
        for seg in layout:
            self.block(seg.space, reason)

    def add_member(self, layout: Layout, module_name: str, role: str) -> None:
        offset = 0
        for seg in layout:
            self.members[seg.space].append(Member(module_name, role, offset, seg.factor))
            offset += self.sizes[seg.space] * seg.factor

    def root_blocked(self, root: int) -> str | None:
        """Reason the united space at ``root`` cannot be pruned, if any member space is blocked."""
        for idx, reason in self.blocked.items():
            if self.find(idx) == root:
                return reason
        return None
