"""Writes into part of a tensor (``dst[index].copy_(value)``) and complex views of the
channels, the way DeepSeek's multi-head latent attention builds its keys and DeepSeek-V2 and
Llama 4 rotate their heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph import build_dependency_graph
from structured_helpers import assert_silenced_removal_exact

HEADS, HEAD_DIM, ROTARY = 4, 6, 2


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


class FilledKeys(nn.Module):
    """Keys made as DeepSeek-V3 makes them: a fresh tensor, each head's own channels copied
    into the front of its head, then a rotary part written into the rest. ``shared`` is how
    that part is made: one per position broadcast to every head (``expand``), the same copied
    out per head (``contiguous``: one value per head as far as the trace can tell), or a
    parameter with a value per head."""

    def __init__(self, shared: str = "expand") -> None:
        super().__init__()
        self.shared = shared
        self.q = nn.Linear(8, HEADS * (HEAD_DIM + ROTARY))
        self.k = nn.Linear(8, HEADS * HEAD_DIM)
        self.rotary = nn.Linear(8, ROTARY)
        self.per_head = nn.Parameter(torch.randn(HEADS, ROTARY))
        self.v = nn.Linear(8, HEADS * 3)  # values narrower than queries and keys
        self.o = nn.Linear(HEADS * 3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        k_own = self.k(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        if self.shared == "parameter":
            k_rot = self.per_head[None, :, None, :].expand(b, -1, t, -1)
        else:
            k_rot = self.rotary(x).view(b, 1, t, ROTARY).expand(-1, k_own.shape[1], -1, -1)
            if self.shared == "contiguous":
                k_rot = k_rot.contiguous()
        keys = k_own.new_empty(*k_own.shape[:-1], HEAD_DIM + ROTARY)
        keys[..., :HEAD_DIM].copy_(k_own)
        keys[..., HEAD_DIM:].copy_(k_rot)
        q = self.q(x).view(b, t, -1, HEAD_DIM + ROTARY).transpose(1, 2)
        v = self.v(x).view(b, t, -1, 3).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, v)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


def _heads(graph) -> list:  # noqa: ANN001
    return [g for g in graph.groups if any(m.module_name == "o" for m in g.members)]


def test_heads_copied_into_a_fresh_tensor_beside_a_broadcast_part_are_units() -> None:
    model = FilledKeys().eval()
    graph = build_dependency_graph(model, _x())
    (heads,) = _heads(graph)
    assert heads.size == HEADS
    assert {m.module_name for m in heads.members} >= {"q", "k", "v", "o"}
    # the rotary part lands in part of each head: its own channels stay whole
    assert ("rotary", "written into part of an axis of another tensor") in graph.blocked
    assert_silenced_removal_exact(model, _x())


@pytest.mark.parametrize("shared", ["contiguous", "parameter"])
def test_a_part_with_a_value_per_head_keeps_the_heads_whole(shared: str) -> None:
    model = FilledKeys(shared).eval()
    graph = build_dependency_graph(model, _x())
    assert _heads(graph) == []
    assert any(
        "k" in names.split(", ") and reason.startswith("overwritten in part of their axis")
        for names, reason in graph.blocked
    )


class PartialChannels(nn.Module):
    """A layer's channels copied into half of a wider channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 6)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], 8)
        y[..., :4].copy_(self.a(x))
        return self.head(y) + self.b(x).sum(-1, keepdim=True)


def test_channels_written_into_part_of_an_axis_stay_whole() -> None:
    graph = build_dependency_graph(PartialChannels().eval(), _x())
    assert ("a", "written into part of an axis of another tensor") in graph.blocked
    assert all(m.module_name != "a" for g in graph.groups for m in g.members)


class ComplexRotary(nn.Module):
    """Heads rotated as complex products: ``view_as_complex`` over (real, imaginary) pairs
    of each head's dims, times a complex table, then ``view_as_real`` and flattened back."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, HEADS * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        angles = torch.arange(t, dtype=torch.float32)[:, None] * torch.ones(HEAD_DIM // 2)
        table = torch.polar(torch.ones_like(angles), angles)
        pairs = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        q = torch.view_as_real(pairs * table).flatten(3).type_as(q)
        return self.o(q.transpose(1, 2).reshape(b, t, -1))


def test_heads_rotated_as_complex_numbers_stay_units() -> None:
    model = ComplexRotary().eval()
    graph = build_dependency_graph(model, _x())
    (heads,) = _heads(graph)
    assert heads.size == HEADS
    assert_silenced_removal_exact(model, _x())


class ComplexChannels(nn.Module):
    """Channels on the (real, imaginary) axis itself: they have no rule."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(8, 2), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.view_as_complex(self.a(x).float().contiguous())
        return self.head(torch.view_as_real(z * 1j))


def test_channels_on_the_real_imaginary_axis_stay_whole() -> None:
    graph = build_dependency_graph(ComplexChannels().eval(), _x())
    assert all(m.module_name != "a" for g in graph.groups for m in g.members)


class PerLayerEmbeddings(nn.Module):
    """Gemma's per-layer embeddings: one projection makes a block of channels per layer
    (``reshape(b, t, layers, width)``), one RMSNorm weight scales every block alike, and
    layer ``i`` multiplies its own block, picked by ``[:, :, i, :]``, into a gate."""

    def __init__(self, layers: int = 3, width: int = 6, norm: bool = True) -> None:
        super().__init__()
        self.layers, self.width = layers, width
        self.embed = nn.Linear(8, 8)
        self.project = nn.Linear(8, layers * width)
        self.norm = nn.RMSNorm(width) if norm else nn.Identity()
        self.gates = nn.ModuleList(nn.Linear(8, width) for _ in range(layers))
        self.outs = nn.ModuleList(nn.Linear(width, 8) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        blocks = self.project(x).reshape(*x.shape[:-1], self.layers, self.width)
        blocks = self.norm(blocks)
        for i, (gate, out) in enumerate(zip(self.gates, self.outs, strict=True)):
            x = x + out(F.gelu(gate(x)) * blocks[:, :, i, :])
        return x


def test_blocks_picked_one_per_layer_fold_into_one_prunable_width() -> None:
    graph = build_dependency_graph(PerLayerEmbeddings().eval(), _x())
    (group,) = [g for g in graph.groups if any(m.module_name == "project" for m in g.members)]
    assert group.size == 6  # entry k of every layer's block is one unit
    names = {m.module_name for m in group.members}
    assert {"project", "norm", "gates.0", "gates.2", "outs.1"} <= names
    (projected,) = [m for m in group.members if m.module_name == "project"]
    assert (projected.repeats, projected.period) == (3, 6)
    assert [why for _, why in graph.blocked] == ["model output"]  # the residual stream


def test_folded_blocks_are_removed_exactly() -> None:
    model = PerLayerEmbeddings(norm=False).eval()
    removals = assert_silenced_removal_exact(model, _x())
    assert any(m.module_name == "project" for g, _ in removals for m in g.members)


def _write(dst: torch.Tensor, key: object, value: object, by: str) -> None:
    """``dst[key] = value``, by ``copy_`` into the slice or by ``__setitem__``."""
    if by == "copy_":
        dst[key].copy_(value)
    else:
        dst[key] = value


class Buffered(nn.Module):
    """A layer's output written into a buffer in one of several ways (``by``: ``copy_`` or
    ``setitem``), then read by ``c``."""

    def __init__(self, how: str, by: str = "copy_") -> None:
        super().__init__()
        self.how, self.by, self.width = how, by, 6
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (b, t, 6)
        if self.how == "select":  # a view made by select: not followed
            buf = h.new_zeros(2, *h.shape)
            _write(buf.select(0, 1), ..., h, self.by)
            return self.b(h) + self.c(buf[1])
        if self.how == "literal":  # made with a width spelled as a number
            buf = torch.zeros(*h.shape[:-1], 6)
        elif self.how == "shape":  # made with the width read off h
            buf = torch.zeros(h.shape)
        else:  # made with a width the pruning rewrites
            buf = torch.zeros(*h.shape[:-1], self.width)
        if self.how == "per channel first":  # a value per channel written before h
            _write(buf, (..., slice(None, 1), slice(None)), torch.arange(6.0), self.by)
            _write(buf, (..., slice(1, None), slice(None)), h[..., 1:, :], self.by)
        else:
            _write(buf, ..., h, self.by)
        return self.b(h) + self.c(buf)


@pytest.mark.parametrize("by", ["copy_", "setitem"])
@pytest.mark.parametrize("how", ["select", "per channel first"])
def test_writes_the_trace_cannot_check_keep_the_channels_whole(how: str, by: str) -> None:
    graph = build_dependency_graph(Buffered(how, by).eval(), _x())
    assert all(m.module_name != "a" for g in graph.groups for m in g.members)
    assert any("a" in names.split(", ") for names, _ in graph.blocked)


@pytest.mark.parametrize("by", ["copy_", "setitem"])
def test_a_buffer_of_a_width_spelled_as_a_number_is_refused_by_the_forward_check(by: str) -> None:
    from secateur import StructuredConfig, prune_

    model = Buffered("literal", by).eval()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert model.a.out_features == 6 and result.refused  # the number could not follow
    assert model(_x()).shape == (2, 5, 3)


@pytest.mark.parametrize("by", ["copy_", "setitem"])
@pytest.mark.parametrize("how", ["attribute", "shape"])
def test_a_buffer_whose_width_follows_takes_the_channels_written_into_it(how: str, by: str) -> None:
    from secateur import StructuredConfig, prune_

    model = Buffered(how, by).eval()
    graph = build_dependency_graph(model, _x())
    (group,) = [g for g in graph.groups if any(m.module_name == "a" for m in g.members)]
    assert {"b", "c"} <= {m.module_name for m in group.members}
    assert_silenced_removal_exact(model, _x())
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert model.a.out_features < 6
    assert model(_x()).shape == (2, 5, 3)
    if how == "attribute":
        assert model.width == model.a.out_features


class IndexedWrites(nn.Module):
    """``dst[key] = value`` into a tracked tensor or by a tracked index: a constant over
    every channel of some positions, or of the rows a boolean mask picks (kept prunable); a
    constant into some channels only, under a mask of every entry, or rows picked by index
    values computed from the channels (all keep them whole)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.how == "constant over the channels":
            h[:, 1:][:, :2] = 0.5  # through a view of h, every channel of two positions
        elif self.how == "constant into some channels":
            h[..., :2] = 0.5
        elif self.how == "zero under a row mask":  # the mask spans the leading axes
            h[x[..., 0] > 0] = 0.0
        elif self.how == "zero under a mask of every entry":
            h[h.detach() > 0] = 0.0
        else:  # "index from the channels"
            marks = torch.zeros(2)
            marks[(h > 0).long()] = 1.0
            h = h * marks.sum()
        return self.b(h)


def test_zeros_written_under_a_mask_of_rows_leave_the_channels_prunable() -> None:
    model = IndexedWrites("zero under a row mask").eval()
    (group,) = build_dependency_graph(model, _x()).groups
    assert {m.module_name for m in group.members} == {"a", "b"}
    assert_silenced_removal_exact(model, _x())


def test_a_constant_over_every_channel_leaves_them_prunable() -> None:
    from secateur.pruning._structured import apply_removals_

    model = IndexedWrites("constant over the channels").eval()
    graph = build_dependency_graph(model, _x())
    (group,) = graph.groups
    assert {m.module_name for m in group.members} == {"a", "b"}
    # the constant acts as a bias on the channels: removing them drops b's reading of it
    units = torch.tensor([1, 4])
    with torch.no_grad():
        model.b.weight[:, units] = 0.0
    expected = model(_x())
    apply_removals_(model, graph, [(group, units)])
    torch.testing.assert_close(model(_x()), expected)


@pytest.mark.parametrize(
    "how",
    ["constant into some channels", "index from the channels", "zero under a mask of every entry"],
)
def test_writes_that_tell_channels_apart_keep_them_whole(how: str) -> None:
    graph = build_dependency_graph(IndexedWrites(how).eval(), _x())
    assert graph.groups == ()
    assert any("a" in names.split(", ") for names, _ in graph.blocked)


class PickedCopy(nn.Module):
    """One channel's values copied into a buffer: its position moves when channels go."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(6, 3), nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        buf = torch.zeros(*h.shape[:-1], 1)
        buf[..., 0].copy_(h[..., -1])
        return self.b(h) + self.c(buf)


def test_one_channel_copied_out_keeps_the_channels_whole() -> None:
    graph = build_dependency_graph(PickedCopy().eval(), _x())
    assert all(m.module_name != "a" for g in graph.groups for m in g.members)


class _FourHeads(nn.Module):
    """Four attention heads of 4 over 16 features; ``heads(x)`` gives q, k, v as
    (batch, heads, tokens, head dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.head_dim = 4, 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape
        return tuple(
            p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )


class _CountedBuffer(_FourHeads):
    """A buffer made from the head count, its count read (a sum over the heads), then filled
    with each head's attention output."""

    def __init__(self, fill: str, counted: bool = True, made: str = "ones") -> None:
        super().__init__()
        self.fill, self.counted, self.made = fill, counted, made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.heads(x)
        shape = (b, self.n_heads, n, self.head_dim)
        if self.made == "ones":
            buf = torch.ones(shape)
        elif self.made == "new_ones":  # from the input (tracked) or a value (untracked)
            buf = x.new_ones(shape)
        elif self.made == "new_ones_untracked":
            buf = x.new_tensor(0.0).new_ones(shape)
        else:
            buf = x.new_full(shape, 1.0)
        # the head count, read by its width
        count = buf.sum(1, keepdim=True).mean() if self.counted else 1.0
        attn = F.scaled_dot_product_attention(q, k, v)
        if self.fill == "setitem":
            buf[:, :, :, :] = attn
        elif (
            self.fill == "slice_copy"
        ):  # through a view of slices, which a trace does not see written
            buf[:, :, :, :].copy_(attn)
        else:  # row by row, through views that drop the batch axis
            for i in range(b):
                buf[i].copy_(attn[i])
        return self.o(buf.transpose(1, 2).reshape(b, n, -1)) * count


@pytest.mark.parametrize("made", ["ones", "new_ones", "new_ones_untracked", "new_full"])
@pytest.mark.parametrize("fill", ["setitem", "slice_copy", "row_copy"])
def test_a_buffer_whose_count_was_read_keeps_the_heads_written_into_it(
    fill: str, made: str
) -> None:
    x = torch.randn(2, 5, 16)
    graph = build_dependency_graph(_CountedBuffer(fill, made=made).eval(), x)
    assert not [g for g in graph.groups if g.kind == "head"]
    # not read: the buffer follows the heads written into it
    graph = build_dependency_graph(_CountedBuffer(fill, False, made).eval(), x)
    assert [g.size for g in graph.groups if g.kind == "head"] == [4]


class _PickedBeforeFill(_FourHeads):
    """A view of one head of a buffer made from the head count, taken before the buffer is
    filled head by head and read after: pruning would move which head that view shows."""

    def __init__(self, pick: str) -> None:
        super().__init__()
        self.pick = pick
        self.o2 = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.heads(x)
        buf = torch.zeros(b, self.n_heads, n, self.head_dim)
        picks = {"int": lambda: buf[:, 0], "negative": lambda: buf[:, -1]}
        picks["ellipsis"] = lambda: buf[..., 0, :, :]
        picks["leading"] = lambda: buf[0]  # the batch's first row: every head, read later
        picks["whole"] = lambda: buf[:, :]  # a view of it all, read after the write
        first = picks[self.pick]()
        buf[:, :, :, :] = F.scaled_dot_product_attention(q, k, v)
        out = self.o(buf.transpose(1, 2).reshape(b, n, -1))
        return out + self.o2(first.reshape(-1, n, 4 * self.head_dim // 4)[..., :4]).sum()


@pytest.mark.parametrize("pick", ["int", "negative", "ellipsis", "leading", "whole"])
def test_a_view_of_a_buffer_taken_before_its_heads_are_written_keeps_them(pick: str) -> None:
    graph = build_dependency_graph(_PickedBeforeFill(pick).eval(), torch.randn(2, 5, 16))
    assert not [g for g in graph.groups if g.kind == "head"]


class _FilledWithCount(_FourHeads):
    """Each head's output scaled by a tensor filled with a value: the head count itself, or a
    mask's -inf turned into a factor that pruning cannot change."""

    def __init__(self, fill: str) -> None:
        super().__init__()
        self.fill = fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.heads(x)
        shape = (b, self.n_heads, n, self.head_dim)
        if self.fill == "count":
            scale = torch.full(shape, float(self.n_heads))
        elif self.fill == "new_count":
            scale = x.new_full(shape, float(self.n_heads))
        else:  # -inf, exp'd to zero, plus one: the same factor at any width
            scale = x.new_full(shape, float("-inf")).exp() + 1
        attn = F.scaled_dot_product_attention(q, k, v) * scale
        return self.o(attn.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("fill", ["count", "new_count", "mask"])
def test_a_tensor_filled_with_the_head_count_is_no_uniform_operand(fill: str) -> None:
    x = torch.randn(2, 5, 16)
    graph = build_dependency_graph(_FilledWithCount(fill).eval(), x)
    heads = [g.size for g in graph.groups if g.kind == "head"]
    if fill == "mask":  # a fill no count spells: the heads go, exactly
        assert heads == [4]
        assert_silenced_removal_exact(_FilledWithCount(fill).eval(), x, skip=("hidden", "channel"))
    else:  # the fill would change with the rewritten count
        assert heads == []


class _ViewThenWrite(_FourHeads):
    """A buffer without channels, a view of it taken first (``alias``), then the heads' output
    written into the buffer (``write``); the view, read after, shows head 0 when ``read``."""

    def __init__(self, made: str, alias: str, write: str, read: bool = True) -> None:
        super().__init__()
        self.made, self.alias, self.write, self.read = made, alias, write, read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.heads(x)
        attn = F.scaled_dot_product_attention(q, k, v)
        buf = getattr(torch, self.made)(b, self.n_heads, n, self.head_dim)
        aliases = {"row": lambda: buf[0][None], "detach": buf.detach, "view": lambda: buf.view(-1)}
        aliases["rows"] = lambda: [buf[i] for i in range(b)]
        view = aliases[self.alias]()
        if self.write == "out":
            torch.mul(attn, 1.0, out=buf)
        elif self.write == "setitem":
            buf[:, :, :, :] = attn
        else:  # each row through the views taken up front
            for i, row in enumerate(view):
                row.copy_(attn[i])
        y = self.o(buf.transpose(1, 2).reshape(b, n, -1))
        return y + view.reshape(b, -1)[:, :4].sum(-1, keepdim=True)[:, None] if self.read else y


@pytest.mark.parametrize("made", ["zeros", "empty"])
@pytest.mark.parametrize(
    ("alias", "write"), [("row", "out"), ("row", "setitem"), ("detach", "out"), ("view", "setitem")]
)
def test_a_view_read_after_a_write_gave_its_memory_heads_keeps_them(
    made: str, alias: str, write: str
) -> None:
    x = torch.randn(2, 5, 16)
    graph = build_dependency_graph(_ViewThenWrite(made, alias, write).eval(), x)
    assert not [g for g in graph.groups if g.kind == "head"]


@pytest.mark.parametrize("made", ["zeros", "empty"])
def test_rows_taken_up_front_and_each_written_still_take_the_heads(made: str) -> None:
    x = torch.randn(2, 5, 16)
    model = _ViewThenWrite(made, "rows", "rows", read=False).eval()
    graph = build_dependency_graph(model, x)
    assert [g.size for g in graph.groups if g.kind == "head"] == [4]
    assert_silenced_removal_exact(model, x, skip=("hidden", "channel"))
