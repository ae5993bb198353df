"""Blocks of vision models the channel graph follows, written as timm writes them: BEiT's
concatenated q/k/v biases and per-head position bias given to sdpa as its mask, ConvNeXt-V2's
global response norm, and MLP-Mixer's token mixing on transposed tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.graph._shapes import index_axes, regrouped_lead
from structured_helpers import assert_silenced_removal_exact

TOKENS, WIDTH = 5, 8


class BeitAttention(nn.Module):
    """q|k|v by one Linear without bias, the bias concatenated from q_bias, a fixed zero
    k_bias buffer and v_bias; a (1, heads, n, n) position bias passed to sdpa as its mask."""

    def __init__(self, width: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = heads
        inner = heads * head_dim
        self.qkv = nn.Linear(width, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.randn(inner))
        self.register_buffer("k_bias", torch.zeros(inner), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(inner))
        self.table = nn.Parameter(torch.randn(2 * TOKENS - 1, heads))
        index = torch.arange(TOKENS)[:, None] - torch.arange(TOKENS)[None, :] + TOKENS - 1
        self.register_buffer("index", index, persistent=False)
        self.proj = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        position = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=position)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last maps: a 2-norm over space, divided by its mean
    over the channels, then ``addcmul`` with a per-channel weight and bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width))
        self.bias = nn.Parameter(torch.rand(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * n)


class MixerBlock(nn.Module):
    """Token mixing by Linears over the token axis of the transposed input, then channel
    mixing; the tokens' Linears must not touch the channels."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.tokens1, self.tokens2 = nn.Linear(tokens, 7), nn.Linear(7, tokens)
        self.up, self.down = nn.Linear(width, 12), nn.Linear(12, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x).transpose(1, 2)
        x = x + self.tokens2(F.gelu(self.tokens1(y))).transpose(1, 2)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, block: str) -> None:
        super().__init__()
        self.block = block
        self.embed = nn.Linear(3, WIDTH)
        if block == "beit":
            self.body = BeitAttention(WIDTH, heads=3, head_dim=2)
        elif block == "grn":
            self.up, self.body = nn.Linear(WIDTH, 12), GlobalResponseNorm(12)
            self.down = nn.Linear(12, WIDTH)
        else:
            self.body = MixerBlock(WIDTH, TOKENS)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.block == "grn":  # (b, 1, tokens, width): one row of a channels-last map
            h = h + self.down(self.body(F.gelu(self.up(h)).unsqueeze(1))).squeeze(1)
        else:
            h = h + self.body(h)
        return self.head(h)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, TOKENS, 3, generator=torch.Generator().manual_seed(seed))


def test_concatenated_biases_and_the_position_bias_lose_whole_heads() -> None:
    graph = build_dependency_graph(Net("beit").eval(), _x())
    assert graph.blocked == (("head", "model output"),)
    (heads,) = [g for g in graph.groups if g.kind == "head"]
    assert heads.size == 3
    sliced = {m.tensor for m in heads.members if m.module_name == "body"}
    assert sliced == {"q_bias", "k_bias", "v_bias", "table"}


def test_grn_and_its_addcmul_follow_the_channels() -> None:
    graph = build_dependency_graph(Net("grn").eval(), _x())
    widths = {g.size: g for g in graph.groups}
    assert {(m.module_name, m.tensor) for m in widths[12].members} >= {
        ("up", ""),
        ("body", "weight"),
        ("body", "bias"),
        ("down", ""),
    }


def test_token_mixing_leaves_the_channels_to_the_channel_layers() -> None:
    graph = build_dependency_graph(Net("mixer").eval(), _x())
    assert graph.blocked == (("head", "model output"),)
    names = {n for g in graph.groups for n in g.module_names()}
    assert not names & {"body.tokens1", "body.tokens2"}  # the token count stays
    assert sorted(g.size for g in graph.groups) == [WIDTH, 12]


@pytest.mark.parametrize("block", ["beit", "mixer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_silenced_units_are_removed_exactly(block: str, seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(Net(block).eval(), _x(seed), seed)


@pytest.mark.parametrize("block", ["beit", "grn", "mixer"])
def test_prune_refuses_nothing(block: str) -> None:
    model, x = Net(block).eval(), _x()
    before = sum(p.numel() for p in model.parameters())
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(_x(1)).shape == (2, TOKENS, 4)


class PoolFormerBlock(nn.Module):
    """timm's MetaFormer block: GroupNorm with one group over the channels, pooling as the
    token mixer, and layer scales viewed to ``self.shape = (dim, 1, 1)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = (width, 1, 1)
        self.norm1, self.norm2 = nn.GroupNorm(1, width), nn.GroupNorm(1, width)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.scale1 = nn.Parameter(torch.rand(width))
        self.scale2 = nn.Parameter(torch.rand(width))
        self.fc1, self.fc2 = nn.Conv2d(width, 4 * width, 1), nn.Conv2d(4 * width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + (self.pool(y) - y) * self.scale1.view(self.shape)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))) * self.scale2.view(self.shape)


def test_metaformer_layer_scales_and_one_group_norms_prune_per_channel() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), PoolFormerBlock(8), nn.Flatten(), nn.Linear(8 * 16, 4)
    ).eval()
    x = torch.randn(2, 3, 4, 4)
    graph = build_dependency_graph(model, x)
    assert sorted((g.kind, g.size) for g in graph.groups) == [("channel", 32), ("hidden", 8)]
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    block = model[1]
    assert block.shape == (4, 1, 1) and block.scale1.shape == (4,)
    assert block.norm1.num_channels == 4 and block.fc1.out_channels == 16
    assert model(x).shape == (2, 4)


class GhostModule(nn.Module):
    """GhostNet's module: a primary conv, a cheap depthwise conv on its output, the two
    concatenated and cut to ``out_chs`` (one channel fewer when ``out_chs`` is odd)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.out_chs = out_chs
        init = -(-out_chs // 2)
        self.primary = nn.Sequential(nn.Conv2d(in_chs, init, 1), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return out[:, : self.out_chs]


class GhostBottleneck(nn.Module):
    """Two ghost modules around a depthwise conv that reads their concatenation, added in
    place to the block's input (``x += shortcut``): the concat's halves meet the input's one
    space, and a depthwise conv passes both halves through."""

    def __init__(self, width: int, mid: int) -> None:
        super().__init__()
        self.ghost1, self.ghost2 = GhostModule(width, mid), GhostModule(mid, width)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        y = self.ghost2(self.dw(self.ghost1(x)))
        y += shortcut
        return y


def _ghost_net(mid: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        GhostBottleneck(8, mid),
        GhostBottleneck(8, mid),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.mark.parametrize("mid", [12, 11])
def test_a_concat_added_to_one_space_and_read_depthwise_is_followed(mid: int) -> None:
    model, x = _ghost_net(mid), torch.randn(2, 3, 6, 6)
    graph = build_dependency_graph(model, x)
    assert graph.blocked == (("0", "model input"), ("5", "model output"))
    # the cheap depthwise conv writes its input's channels again: the residual's 8 channels
    # are the 4 of each block's second primary conv, twice
    (residual,) = [g for g in graph.groups if "0" in g.module_names()]
    assert residual.size == 4
    # an odd cut drops the cheap copy of the last primary channel, which stays as one alone
    sizes = sorted(g.size for g in graph.groups if "1.dw" in g.module_names())
    assert sizes == ([6] if mid == 12 else [1, 5])
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert model[1].ghost1.out_chs == model[1].dw.in_channels < mid
    assert model(x).shape == (2, 4)


@pytest.mark.parametrize("mid", [12, 11])
@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_ghost_units_are_removed_exactly(mid: int, seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(_ghost_net(mid), torch.randn(2, 3, 6, 6), seed)


@pytest.mark.parametrize(
    ("shape", "out", "d", "expected"),
    [
        # Twins: windows regrouped, q|k|v split into (3, heads, head_dim) in one reshape
        ((1, 2, 2, 3, 3, 24), (1, 4, 9, 3, 2, 4), 5, ((1, 4, 9, 24), 3)),
        # and back: (heads, head_dim) merged while the windows split again
        ((1, 4, 9, 2, 4), (1, 2, 2, 3, 3, 8), 3, ((1, 2, 2, 3, 3, 2, 4), 5)),
        ((2, 5, 24), (2, 5, 3, 8), 2, None),  # the leading axes already agree
        ((2, 6, 4), (3, 2, 2, 4), 1, None),  # no cut before the channels' axis fits
    ],
)
def test_regrouped_lead_separates_the_leading_axes_from_the_channels_run(
    shape: tuple, out: tuple, d: int, expected: tuple | None
) -> None:
    assert regrouped_lead(shape, out, d) == expected


class RelPosBias(nn.Module):
    """timm's relative position bias: a table gathered and viewed to a shape attribute
    ``(window_area, window_area, num_heads)``, read by the attention through ``get_bias()``,
    a method of this module, which itself never runs as a module."""

    def __init__(self, window: int, heads: int) -> None:
        super().__init__()
        area = window * window
        self.bias_shape = (area, area, heads)
        self.table = nn.Parameter(torch.randn(2 * area - 1, heads))
        index = torch.arange(area)[:, None] - torch.arange(area)[None, :] + area - 1
        self.register_buffer("index", index.view(-1), persistent=False)

    def get_bias(self) -> torch.Tensor:
        return self.table[self.index].view(self.bias_shape).permute(2, 0, 1).unsqueeze(0)


class ChannelsLastAttention(nn.Module):
    """MaxViT's attention on (B, H, W, C) windows: q|k|v reshaped to (B, H * W, 3, heads,
    head_dim) in one reshape that also merges the spatial axes."""

    def __init__(self, width: int, heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.dim_head = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.rel_pos = RelPosBias(window, heads)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, shape = x.shape[0], x.shape[:-1]
        qkv = self.qkv(x).reshape(b, -1, 3, self.num_heads, self.dim_head).transpose(1, 3)
        q, k, v = qkv.unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos.get_bias())
        return self.proj(y.transpose(1, 2).reshape(shape + (-1,)))


def test_heads_follow_a_spatial_merge_and_a_bias_shape_read_by_a_helper_method() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), ChannelsLastAttention(8, 4, 2), nn.Linear(8, 2))
    x = torch.randn(2, 2, 2, 3)
    graph = build_dependency_graph(model.eval(), x)
    (heads,) = [g for g in graph.groups if g.kind == "head"]
    assert heads.size == 4 and "1.rel_pos" in heads.module_names()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    attn = model[1]
    assert attn.num_heads == attn.rel_pos.table.shape[1] < 4
    assert attn.rel_pos.bias_shape == (4, 4, attn.num_heads)
    assert model(x).shape == (2, 2, 2, 2)
    assert model.secateur_attributes["1.rel_pos"] == {"bias_shape": [4, 4, attn.num_heads]}


@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_heads_under_a_spatial_merge_are_removed_exactly(seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), ChannelsLastAttention(8, 4, 2), nn.Linear(8, 2))
    assert_silenced_removal_exact(model.eval(), torch.randn(2, 2, 2, 3), seed)


def test_index_axes_places_one_integer_tensor_index_where_its_axis_was() -> None:
    idx = torch.zeros(4, 4, dtype=torch.long)
    whole = slice(None)
    # TinyViT's attention_biases[:, idxs]: heads stay first, the index's two axes follow
    assert index_axes((3, 10), (whole, idx)) == [(0, whole), (1, ("tensor", 2))]
    assert index_axes((3, 10, 5), (whole, idx)) == [(0, whole), (1, ("tensor", 2)), (3, whole)]
    assert index_axes((3, 10), (whole, torch.tensor(2))) == [(0, whole), (-1, ("tensor", 0))]
    assert index_axes((3, 10), (0, idx)) is None  # beside an int the axes move to the front
    assert index_axes((3, 10), (whole, idx > 0)) is None
    assert index_axes((3, 10), (idx, idx)) is None


class SharedEncoder(nn.Module):
    """CoaT's layout: one position encoder owned by the model and handed to every block,
    so it is registered under several paths."""

    def __init__(self) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem = nn.Conv2d(3, 8, 1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"cpe": self.cpe, "fc": nn.Conv2d(8, 8, 1)}) for _ in range(2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["fc"](block["cpe"](x))
        return self.head(x)


def test_tracing_leaves_a_module_registered_under_two_paths_with_its_own_tensors() -> None:
    torch.manual_seed(0)
    model, x = SharedEncoder().eval(), torch.randn(1, 3, 4, 4)
    weights = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        expected = model(x)
    build_dependency_graph(model, x)  # traced on meta tensors first
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p for n, p in weights.items())
    assert not any(p.is_meta for p in after.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
