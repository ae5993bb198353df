"""einsum, relative position tables, ``new_zeros`` and ``F.normalize`` in the channel graph:
toy modules written the way MaxViT, Swin and timm write attention, each pruned exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.graph._einsum import einsum_letters
from secateur.pruning._structured import apply_removals_
from structured_helpers import assert_silenced_removal_exact, random_units, silence_

TOKENS = 4  # a 2 x 2 window


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("bhid,bhjd->bhij", [(2, 3, 4, 5), (2, 3, 6, 5)]),
        ("B G H I D, B G H J D -> B G H I J", [(1, 2, 3, 4, 5), (1, 2, 3, 6, 5)]),
        ("...ij,...jd", [(2, 3, 4, 6), (2, 3, 6, 5)]),  # implicit: ...di, alphabetical
        ("...ij,jd->...id", [(7, 2, 4, 6), (6, 5)]),
        ("ij,j", [(4, 6), (6,)]),
        ("bld,de->ble", [(2, 4, 6), (6, 5)]),
        ("Ab,bA", [(3, 4), (4, 3)]),  # upper case sorts first
        ("i...,...j->ij...", [(4, 2, 3), (1, 3, 5)]),  # ellipsis broadcast from the right
    ],
)
def test_einsum_letters_match_torch_shapes(equation: str, shapes: list[tuple[int, ...]]) -> None:
    operands = [torch.zeros(s) for s in shapes]
    out = torch.einsum(equation, *operands)
    letters, result = einsum_letters(equation, [t.dim() for t in operands])
    assert [len(s) for s in letters] == [t.dim() for t in operands]
    sizes = {}
    for s, t in zip(letters, operands, strict=True):
        for c, n in zip(s, t.shape, strict=True):
            sizes[c] = max(sizes.get(c, 1), n)
    assert tuple(sizes[c] for c in result) == out.shape


@pytest.mark.parametrize(
    "equation, ndims",
    [
        ("ij,jk", [2, 3]),  # a term with fewer letters than axes
        ("ij,jk", [2]),  # more terms than operands
        ("ij->ii", [2]),  # an output letter twice
        ("i...j...->i", [4]),  # two ellipses
        ("ij,jk->iq", [2, 2]),  # an output letter no input has
        ("i1,1j", [2, 2]),  # not a letter
    ],
)
def test_einsum_letters_refuse_what_does_not_fit(equation: str, ndims: list[int]) -> None:
    assert einsum_letters(equation, ndims) is None


class WindowAttention(nn.Module):
    """MaxViT/Swin-style attention over a 2x2 window: q|k|v packed as (3, heads, head_dim),
    scores by einsum, a learned relative position bias gathered from a (positions, heads)
    table, an optional mask made with ``new_zeros`` and cosine attention by ``normalize``."""

    def __init__(self, width: int, heads: int, head_dim: int, *, cosine: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.cosine = heads, head_dim, cosine
        self.to_qkv = nn.Linear(width, 3 * heads * head_dim)
        self.merge = nn.Linear(heads * head_dim, width)
        self.table = nn.Parameter(torch.randn(9, heads))  # (2 * 2 - 1) ** 2 offsets
        index = torch.tensor([[(i // 2 - j // 2 + 1) * 3 + (i % 2 - j % 2 + 1) for j in range(4)]
                              for i in range(4)])  # fmt: skip
        self.register_buffer("index", index)
        self.logit_scale = nn.Parameter(torch.rand(heads, 1, 1) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            scores = torch.einsum("bhid,bhjd->bhij", F.normalize(q, dim=-1), F.normalize(k, dim=-1))
            scores = scores * self.logit_scale.exp()
        else:
            scores = torch.einsum("bhid,bhjd->bhij", q, k) * self.head_dim**-0.5
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        mask = x.new_zeros((n, n))
        mask[0, 1:] = -1.0
        scores = scores + bias + mask
        out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)
        return self.merge(out.transpose(1, 2).reshape(b, n, -1))


class EinsumMLP(nn.Module):
    """A feed-forward layer whose Linears are written as einsum with plain parameters."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(width, hidden) / width**0.5)
        self.w_out = nn.Parameter(torch.randn(hidden, width) / hidden**0.5)
        self.b_in = nn.Parameter(torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.einsum("bnd,de->bne", x, self.w_in) + self.b_in)
        return torch.einsum("bne,ed->bnd", h, self.w_out)


class Net(nn.Module):
    def __init__(self, *, cosine: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.attn = WindowAttention(8, heads=3, head_dim=2, cosine=cosine)
        self.mlp = EinsumMLP(8, 6)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        return self.head(x + self.mlp(x))


def _x() -> torch.Tensor:
    return torch.randn(2, TOKENS, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cosine", [False, True])
def test_heads_and_einsum_neurons_are_found(cosine: bool) -> None:
    graph = build_dependency_graph(Net(cosine=cosine).eval(), _x())
    assert graph.blocked == (("head", "model output"),)
    heads = [g for g in graph.groups if g.kind == "head"]
    assert [g.size for g in heads] == [3]
    sliced = {(m.module_name, m.tensor) for m in heads[0].members}
    assert ("attn", "table") in sliced  # the relative position bias loses the same heads
    if cosine:
        assert ("attn", "logit_scale") in sliced
    # the residual stream (no norm pools it here, so it is a plain channel group) and the MLP
    neurons = [g for g in graph.groups if g.kind == "channel" and g.size == 6]
    assert len(neurons) == 1
    assert {(m.module_name, m.tensor, m.dim) for m in neurons[0].members} >= {
        ("mlp", "w_in", 1),
        ("mlp", "b_in", 0),
        ("mlp", "w_out", 0),
    }


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_silenced_heads_and_einsum_neurons_are_removed_exactly(cosine: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model, x = Net(cosine=cosine).eval(), _x()
    graph = build_dependency_graph(model, x)
    gen = torch.Generator().manual_seed(seed)
    removals = []
    for group in graph.groups:
        if group.kind == "hidden":
            continue
        units = random_units(group, gen)
        silence_(model, group, units)
        removals.append((group, units))
    with torch.no_grad():
        expected = model(x)
    apply_removals_(model, graph, removals)
    assert model.attn.heads < 3 and model.attn.table.shape[1] == model.attn.heads
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_prune_runs_at_every_kind() -> None:
    model, x = Net(cosine=True).eval(), _x()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert model.mlp.w_in.shape == (4, 3) and model.attn.heads < 3
    assert model(x).shape == (2, TOKENS, 3)


class ContractsChannels(nn.Module):
    """Token-to-token scores summed over the channels of two activations, and channels
    scaled by a fresh constant: nothing may go from them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 6)
        self.c = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bnd,bmd->bnm", self.a(x), self.b(x))
        scale = torch.arange(6.0, device=x.device)  # not a parameter: it cannot be sliced
        return scores.sum() + torch.einsum("bnd,d->bnd", self.c(x), scale)


def test_contraction_of_activations_or_constants_blocks_the_channels() -> None:
    graph = build_dependency_graph(ContractsChannels().eval(), _x())
    assert graph.groups == ()
    blocked = dict(graph.blocked)
    assert blocked["a"] == blocked["b"] == "summed against another's channels"
    assert blocked["c"] == "op 'einsum' has no channel rule"


def test_a_buffer_contracted_like_a_weight_loses_the_same_rows() -> None:
    class Codebook(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 6)
            self.register_buffer("codebook", torch.randn(6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bnd,dk->bnk", self.proj(x), self.codebook)

    graph = build_dependency_graph(Codebook().eval(), _x())
    assert [(m.module_name, m.role, m.tensor) for g in graph.groups for m in g.members] == [
        ("proj", "linear_out", ""),
        ("", "param", "codebook"),
    ]


def test_normalize_over_the_channels_pools_them() -> None:
    """A p-norm over the channels is a statistic of them all, as a LayerNorm's: the channels
    go as a group of the ``hidden`` kind, and removing ones that were zero is exact."""

    class Normalized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.normalize(self.a(x), dim=-1))

    model = Normalized().eval()
    graph = build_dependency_graph(model, _x())
    assert [(g.kind, g.size) for g in graph.groups] == [("hidden", 6)]
    assert_silenced_removal_exact(model, _x(), skip=())


def test_torchvision_maxvit_loses_heads_with_their_position_bias() -> None:
    """MaxViT scores by einsum and adds a bias gathered from a (positions, heads) table, and
    reshapes the heads back to the width of its input (read from the input's shape): heads
    go with as many hidden channels, the MLPs on their own, and nothing is refused."""
    maxvit = pytest.importorskip("torchvision.models.maxvit")
    torch.manual_seed(0)
    model = maxvit.MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=3,
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    # the heads reshaped back to the input's width, read from its shape: one group with it
    assert {g.kind for g in result.graph.groups} == {"channel", "hidden"}
    attn = model.blocks[1].layers[0].layers.grid_attention.attn_layer[1]
    assert attn.n_heads == 2 and attn.relative_position_bias_table.shape[1] == 2
    assert model(x).shape == (1, 3)


# -- found by review ---------------------------------------------------------------------------
class CatWeight(nn.Module):
    """A Linear whose weight and bias are concatenated from two parameters each, run by
    F.linear, and an einsum projection whose weight is two parameters side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.wq, self.wk = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
        self.bq, self.bk = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
        self.out = nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        y = F.linear(h, torch.cat([self.wq, self.wk]), torch.cat([self.bq, self.bk]))
        z = torch.einsum("bnd,de->bne", h, torch.cat([self.w1, self.w2], dim=1))
        return self.out(torch.cat([torch.relu(y), z], -1))


class SharedParameter(nn.Module):
    """One parameter read by the channels of two layers (a scale and an einsum weight), and
    an add whose second operand is given by keyword: all must be one group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(5, 8)
        self.s = nn.Parameter(torch.randn(8))
        self.w = nn.Parameter(torch.randn(8, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.add(self.a(x) * self.s, other=torch.relu(self.c(x)))
        b = torch.relu(self.b(x)) * self.s
        y = torch.einsum("bnd,de->bne", a, self.w) + torch.einsum("bnd,de->bne", b, self.w)
        return self.out(y)


@pytest.mark.parametrize("model_type", [CatWeight, SharedParameter])
def test_review_cases_are_removed_exactly(model_type: type[nn.Module]) -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        assert_silenced_removal_exact(model_type().eval(), _x(), seed, skip=())


def test_one_parameter_read_by_two_layers_joins_them() -> None:
    graph = build_dependency_graph(SharedParameter().eval(), _x())
    (group,) = [g for g in graph.groups if g.size == 8]
    assert {"a", "b", "c"} <= set(group.module_names())


def test_a_per_head_mask_that_is_no_parameter_keeps_multi_query_heads() -> None:
    """ALiBi-like slopes computed from the head count cannot be sliced with the heads."""

    class MultiQuery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads, self.hd = 3, 2
            self.q, self.kv, self.o = nn.Linear(5, 6), nn.Linear(5, 4), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q = self.q(x).view(b, n, self.heads, self.hd).transpose(1, 2)
            k, v = (t.unsqueeze(1) for t in self.kv(x).split(self.hd, -1))
            slopes = 2.0 ** -torch.arange(1, self.heads + 1, dtype=x.dtype)
            pos = torch.arange(n, dtype=x.dtype)
            mask = slopes[:, None, None] * -(pos[:, None] - pos[None, :]).abs()
            y = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)
            return self.o(y.transpose(1, 2).reshape(b, n, -1))

    graph = build_dependency_graph(MultiQuery().eval(), _x())
    assert not [g for g in graph.groups if g.kind == "head"]
    assert ("o, q", "a mask with a value per head") in graph.blocked


def test_vector_norm_over_tokens_and_a_permute_by_keyword_pass() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 3)
            self.table = nn.Parameter(torch.randn(8, TOKENS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h = h / torch.linalg.vector_norm(h, 2, dim=1, keepdim=True)
            return self.o(h + self.table.permute(dims=(1, 0)))

    graph = build_dependency_graph(Scaled().eval(), _x())
    (group,) = graph.groups
    assert ("", "table", 0) in {(m.module_name, m.tensor, m.dim) for m in group.members}
