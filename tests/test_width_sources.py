"""Which attribute a width read in a reshape came from: the one spelled at the width's own
entry, none when that entry was read from a tensor's shape, only those passed to a helper
that ran the reshape, and an attribute copied into a local first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph import build_dependency_graph
from secateur.graph._width_notes import bare_name_at, names_at, shape_locals
from secateur.pruning import StructuredConfig, prune_


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(b, h, w, c) -> (b * windows, size * size, c), as timm's Swin writes it."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c)


class Windows(nn.Module):
    """A window of 4 x 4 = 16 tokens over 16 channels: ``window_area`` holds the width's
    value, but no reshape reads it as the width."""

    def __init__(self) -> None:
        super().__init__()
        self.window, self.window_area = 4, 16
        self.embed, self.up = nn.Linear(3, 16), nn.Linear(16, 16)
        self.down, self.head = nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(self.embed(x)))
        B, H, W, C = h.shape
        windows = window_partition(h, self.window)
        windows = windows.view(-1, self.window_area, C)
        return self.head(self.down(windows).mean(1))


class AliasedHeads(nn.Module):
    """The head count copied into a local before the view spells it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 4, 3
        self.qkv, self.proj = nn.Linear(6, 36), nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        heads = self.num_heads
        q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


def test_names_at_reads_the_entry_of_a_spelled_shape() -> None:
    assert names_at("x.view(-1, self.window_area, C)", 2, 3) == {"C"}
    assert names_at("x.view(-1, self.window_area, C)", 1, 3) == {"self", "window_area"}
    assert names_at("x.reshape((b, n, self.h * self.d))", 2, 3) == {"self", "h", "d"}
    assert names_at("x.view(shape)", 0, 3) == {"shape"}  # one name holds the whole shape
    assert names_at("self.scale.view(self.shape)", 0, 3) == {"self", "shape"}
    assert names_at("x.view(*lead, -1, d)", 2, 3) is None
    assert names_at("torch.reshape(x, (C, -1))", 0, 2) == {"C"}
    assert names_at("(y\n .reshape(B, N, C))", 2, 3) == {"C"}  # a chain over two lines
    assert names_at("f(x, 3)", 0, 2) is None
    assert bare_name_at("y.reshape(B, N, C)", 2, 3) == "C"
    assert bare_name_at("y.reshape(B, N, C // 2)", 2, 3) is None


def test_shape_locals_are_found_in_the_bytecode() -> None:
    def code(self, x):  # noqa: ANN001, ANN202
        B, N, C = x.shape
        D = x.shape[-1]
        b, c = x.size()
        e = x.size(1)
        h = self.heads
        return B, N, C, D, b, c, e, h

    found = shape_locals(code.__code__)
    assert found.keys() == {"B", "N", "C", "D", "b", "c", "e"}
    entries = {name: entry for name, (_, entry) in found.items()}
    assert entries == {"B": 0, "N": 1, "C": 2, "D": -1, "b": 0, "c": 1, "e": 1}


def test_an_attribute_spelled_at_another_entry_keeps_its_value() -> None:
    model, x = Windows().eval(), torch.randn(2, 8, 8, 3)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert model.up.out_features == 8 and model.down.in_features == 8
    assert (model.window, model.window_area) == (4, 16)
    assert model(x).shape == (2 * 4, 2)
    notes = [a for a in build_dependency_graph(Windows(), x).attributes if a.value == 16]
    assert {(a.passed, a.from_shape) for a in notes} == {(True, True), (False, True)}


def test_an_attribute_copied_into_a_local_is_still_rewritten() -> None:
    model, x = AliasedHeads().eval(), torch.randn(2, 5, 6)
    result = prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert result.refused == ()
    assert model.num_heads == 2 and model.qkv.out_features == 18
    assert model(x).shape == (2, 5, 6)


class WidthFromInput(nn.Module):
    """Attention whose output is reshaped to the width of its input, read from the input's
    shape (timm's BEiT, EVA, Swin-V2, PVT-v2; torchvision's Swin): heads and the hidden
    width must lose as many channels."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 3
        self.embed, self.head = nn.Linear(5, 12), nn.Linear(12, 2)
        self.norm = nn.LayerNorm(12)
        self.qkv, self.proj = nn.Linear(12, 36), nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x))
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y))


def test_a_width_read_from_another_tensors_shape_ties_the_two() -> None:
    model, x = WidthFromInput().eval(), torch.randn(2, 5, 5)
    graph = build_dependency_graph(model, x)
    (group,) = [g for g in graph.groups if "qkv" in g.module_names()]
    assert {"embed", "norm", "qkv", "proj", "head"} <= set(group.module_names())
    assert group.size == 3  # whole heads, each with 4 hidden channels
    assert group.kind == "hidden"  # the norm pools those channels: not removed exactly
    for ratio in (0.3, 0.5, 0.7):
        model = WidthFromInput().eval()
        result = prune_(model, StructuredConfig(ratio=ratio), example_inputs=x)
        assert result.refused == ()
        assert model.embed.out_features == 4 * model.num_heads < 12
        assert model(x).shape == (2, 5, 2)


def test_torchvision_swin_loses_heads_with_its_hidden_width() -> None:
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    model = swin.SwinTransformer(
        patch_size=[2, 2],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=3,
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    before = sum(p.numel() for p in model.parameters())
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert sum(p.numel() for p in model.parameters()) < 0.35 * before
    assert model(x).shape == (1, 3)


class CrossAttention(nn.Module):
    """Two inputs of one width: the output is reshaped with the width read from ``x``, so
    the heads tie to x's channels, not to ctx's, whichever shape was read last."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 3
        self.ex, self.ec = nn.Linear(5, 12), nn.Linear(5, 12)
        self.q, self.kv = nn.Linear(12, 12), nn.Linear(12, 24)
        self.out = nn.Linear(12, 2)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        x, ctx = self.ex(a), self.ec(a)
        B, N, C = x.shape
        _, M, _ = ctx.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, M, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.out(y + x)


def test_the_tie_follows_the_tensor_the_width_was_read_from() -> None:
    model, x = CrossAttention().eval(), torch.randn(2, 5, 5)
    graph = build_dependency_graph(model, x)
    (tied,) = [g for g in graph.groups if "q" in g.module_names()]
    assert "ex" in tied.module_names() and "ec" not in tied.module_names()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert model(x).shape == (2, 5, 2)


class ShapeAttributes(nn.Module):
    """A tuple attribute that merely holds a width in one of its entries (a pooling window
    ``(4, 1)``) is no shape of the heads, and keeps its value."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.pool = 4, (4, 1)
        self.qkv, self.proj = nn.Linear(6, 24), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, -1)
        q, k, v = (z.view(shape).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        mask = F.avg_pool2d(torch.zeros(1, 1, 8, 8), self.pool, stride=1, padding=0)[..., :t, :t]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


def test_a_tuple_holding_a_width_in_one_entry_is_left_alone() -> None:
    model, x = ShapeAttributes().eval(), torch.randn(2, 5, 6)
    result = prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert result.refused == ()
    assert model.num_heads == 2 and model.pool == (4, 1)
