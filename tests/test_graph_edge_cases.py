"""Edge cases of the channel rules and width attributes, each once a wrong or crashing
prune: a concat holding a piece of no width added to a cut layout, a width handed to a helper
module's method, a conv's tensor that may scale its inputs, a shape attribute beside an int of
the same value, split sizes spelled entry by entry beside a tuple holding them, comparisons
inside an activation, and a Linear that returns more than its output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from structured_helpers import assert_silenced_removal_exact


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


class EmptyPiece(nn.Module):
    """``cat([a, a[:, :0], b])`` (an optional slice configured off) plus a layout cut in two
    halves: equal cuts, but one layout has a segment of no width."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)
        self.n_extra = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = torch.cat([a, a[:, : self.n_extra], self.b(x)], 1)
        z = self.c(x)
        return self.head(y + torch.cat([z[:, :4], z[:, 4:]], 1))


def test_a_piece_of_no_width_in_an_add_blocks_instead_of_crashing() -> None:
    graph = build_dependency_graph(EmptyPiece().eval(), _x())
    assert graph.groups == ()
    assert any("has no channel rule" in reason for _, reason in graph.blocked)


class Heads(nn.Module):
    """A helper module whose methods split and merge heads; never run as a module."""

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, -1).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)


class HandedHeads(nn.Module):
    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.heads = Heads()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        q = self.heads.split(q, self.num_heads)
        k = self.heads.split(k, self.num_heads)
        v = self.heads.split(v, self.num_heads)
        return self.proj(self.heads.merge(F.scaled_dot_product_attention(q, k, v)))


def _handed() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), HandedHeads(), nn.Linear(16, 3)).eval()


def test_a_width_handed_to_a_helper_method_is_the_callers_attribute() -> None:
    torch.manual_seed(0)
    model, x = _handed(), torch.randn(2, 5, 8)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    attn = model[1]
    assert attn.num_heads * 4 == attn.qkv.out_features // 3 < 16
    assert model.secateur_attributes == {"1": {"num_heads": attn.num_heads}}


@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_heads_handed_to_a_helper_are_removed_exactly(seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(_handed(), torch.randn(2, 5, 8), seed)


class InputScaledConv(nn.Conv2d):
    """A square conv with one value per input channel: ``(C,)`` could be either side."""

    def __init__(self, c: int) -> None:
        super().__init__(c, c, 3, padding=1)
        self.in_scale = nn.Parameter(torch.rand(c) * 4 + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.in_scale[:, None, None])


def test_a_conv_tensor_not_shaped_per_filter_leaves_the_layer_whole() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        InputScaledConv(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    graph = build_dependency_graph(model, _x())
    assert [g.producers() for g in graph.groups] == [["4"]]
    reason = "2.in_scale of shape (8,) is not one value per filter"
    assert sorted(r for _, r in graph.blocked if "in_scale" in r) == [reason, reason]


class ScaledPool(nn.Module):
    """A layer scale viewed to a shape attribute, beside an int that equals the width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.tokens = dim
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


def test_a_shape_attribute_is_rewritten_and_an_int_of_the_same_value_is_not() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        ScaledPool(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert model[1].shape == (4, 1, 1) and model[1].tokens == 8
    assert model.secateur_attributes == {"1": {"shape": [4, 1, 1]}}


class SpelledSplit(nn.Module):
    """``split(x, [self.a, self.b])`` in a module that also holds ``(a, b)`` for another use."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.out_sizes = (a, b)
        self.dw = nn.Conv2d(a, a, 3, padding=1, groups=a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(x, [self.a, self.b], dim=1)
        assert len(self.out_sizes) == 2
        return torch.cat([self.dw(p), q], 1)


def test_sizes_spelled_entry_by_entry_rewrite_their_ints_not_a_tuple_of_the_same_value() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        SpelledSplit(10, 6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).eval()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert result.refused == ()
    mix = model[1]
    assert (mix.a, mix.b) == (mix.dw.in_channels, model[0].out_channels - mix.dw.in_channels)
    assert mix.a < 10 and mix.out_sizes == (10, 6)
    assert model(_x()).shape == (2, 2)


class OpenSlice(nn.Module):
    """DPN's split: ``y[:, :self.n]`` and ``y[:, self.n:]``, the rest as wide as ``n``."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 4
        self.conv = nn.Conv2d(3, 8, 1)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(torch.cat([self.a(y[:, : self.n]), self.b(y[:, self.n :])], 1))


def test_an_open_ended_slice_rewrites_its_start_only() -> None:
    """The attribute of ``y[:, self.n:]`` is where the rest starts: it follows the head's width,
    never the rest's, even when both are equal."""
    from secateur.pruning._structured import apply_removals_

    torch.manual_seed(0)
    model, x = OpenSlice().eval(), torch.randn(1, 3, 4, 4)
    graph = build_dependency_graph(model, x)
    head, rest = (
        next(g for g in graph.groups if "conv" in g.producers() and any(
            m.module_name == reader and m.role == "conv_in" for m in g.members))
        for reader in ("a", "b")
    )  # fmt: skip
    apply_removals_(model, graph, [(head, torch.tensor([0])), (rest, torch.tensor([0, 1]))])
    assert model.n == 3
    assert model(x).shape == (1, 2, 4, 4)


class ComparingActivation(nn.Module):
    """Apertus's xIELU: ``torch.where(x > 0, ...)`` and ``torch.min(x, eps)`` with a 0-d
    buffer act on each channel alone."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = torch.where(h > 0, h * h, torch.expm1(torch.min(h, self.eps)) - h)
        return self.down(h)


def test_comparisons_and_an_elementwise_min_let_the_channels_through() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(ComparingActivation().eval(), x)
    assert [sorted(g.module_names()) for g in graph.groups] == [["down", "up"]]
    assert_silenced_removal_exact(ComparingActivation().eval(), x)


class TupleRouter(nn.Linear):
    """PhiMoE's router: a Linear whose forward returns its logits and the index they pick."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return logits, logits.argmax(-1)


class Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.router = nn.Linear(4, 8), TupleRouter(8, 3)
        self.experts = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        logits, _ = self.router(h)
        return self.experts(h) * logits.softmax(-1)


def test_a_linear_returning_more_than_its_output_reads_the_channels_and_keeps_its_rows() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    model = Routed().eval()
    (group,) = build_dependency_graph(model, x).groups
    assert {"inp", "router", "experts"} <= set(group.module_names())
    assert_silenced_removal_exact(Routed().eval(), x)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert model.router.weight.shape == (3, 4) and model(x).shape == (3, 3)


class InterleavedGateUp(nn.Module):
    """GPT-OSS's FFN: gate and up interleaved in one projection, picked with a step of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up, self.down = nn.Linear(4, 16), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        gate, up = h[..., ::2], h[..., 1::2]
        return self.down(gate * torch.sigmoid(gate) * (up + 1))


def test_features_picked_with_a_step_make_units_of_that_many() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    model = InterleavedGateUp().eval()
    (group,) = build_dependency_graph(model, x).groups
    assert group.size == 8 and set(group.module_names()) == {"gate_up", "down"}
    assert_silenced_removal_exact(InterleavedGateUp().eval(), x)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert model.gate_up.out_features == 8 and model.down.in_features == 4


class ReadsOwnColumns(nn.Module):
    """A layer's own weight also read at two fixed columns: after pruning they would be others."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = self.fc2.weight.index_select(1, torch.tensor([0, 3]))
        return self.fc2(torch.relu(self.fc1(x))) + columns.sum()


def test_a_weight_read_at_fixed_columns_keeps_them() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(ReadsOwnColumns().eval(), x)
    assert graph.groups == ()
    assert any("fixed indices" in reason for _, reason in graph.blocked)


class HeadNorm(nn.Module):
    """An ``nn.RMSNorm`` over each head's dims while the heads are the channels (Persimmon's
    q_layernorm): it acts within each head, its weight shared by all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.norm, self.o = nn.Linear(8, 16), nn.RMSNorm(4), nn.Linear(16, 8)
        self.heads = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return self.o(self.norm(self.q(x).view(b, t, self.heads, -1)).reshape(b, t, -1))


def test_a_norm_module_over_each_heads_dims_lets_the_heads_through() -> None:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(HeadNorm().eval(), x)
    (heads,) = [g for g in graph.groups if any(m.module_name == "o" for m in g.members)]
    assert heads.size == 4 and all(m.module_name != "norm" for m in heads.members)
    assert_silenced_removal_exact(HeadNorm().eval(), x)
