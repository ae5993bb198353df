"""Property tests: random transformer-like models written in plain PyTorch prune by whole heads.

Each model is drawn from a space of common ways to write attention by hand: separate or fused
q/k/v projections, grouped-query attention (key/value heads shared by several query heads, down
to one: multi-query), ``F.scaled_dot_product_attention`` with ``enable_gqa`` or key/value heads
repeated by ``repeat_interleave`` or an HF-style ``expand`` + ``reshape``, or an explicit
``matmul`` + ``softmax``; pre- or post-norm with LayerNorm, RMSNorm or a hand-written RMSNorm;
a GELU or gated-SiLU (SwiGLU) MLP. Head counts are plain int attributes used in the ``view``, as
in most hand-written models, so the engine must find and rewrite them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.measure import count_macs
from secateur.pruning._structured import apply_removals_, units_to_keep
from structured_helpers import random_units, silence_, silence_readers_

VOCAB, CLASSES, FEATURES, SEQ = 11, 3, 5, 6


@dataclass(frozen=True)
class Arch:
    """One point of the architecture space (see the module docstring)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    fused: bool  # one qkv Linear split with .split (or .chunk when q, k, v are equal widths)
    share: str  # how kv heads meet query heads: "gqa" (enable_gqa), "repeat", "expand"
    compute: str  # "sdpa", "matmul" or "einsum" (explicit scores and softmax)
    causal: bool
    reshape: str  # "view", "reshape", "unflatten"
    norm: str  # "layernorm", "rmsnorm", "manual_rms"
    prenorm: bool
    mlp: str  # "gelu" or "swiglu"
    bias: bool
    embed: bool  # token ids through an Embedding, else float features through a Linear
    # fused q|k|v (equal widths) viewed as (3, heads, head_dim): "unbind" along the 3
    # (ModernBERT), or permuted first, 3 in front, then "permute" unbind (timm) or "index"
    # x[0], x[1], x[2] (torchvision's Swin); "" for none
    packed: str = ""


class ManualRMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, width: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "rmsnorm":
        return nn.RMSNorm(width)
    return ManualRMSNorm(width)


class Attention(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.num_heads = arch.heads
        self.num_kv_heads = arch.kv_heads
        self.head_dim = arch.head_dim
        self.fused, self.share, self.compute = arch.fused, arch.share, arch.compute
        self.packed = arch.packed if arch.fused and arch.heads == arch.kv_heads else ""
        self.causal, self.reshape_by = arch.causal, arch.reshape
        q_width, kv_width = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
        if arch.fused:
            self.qkv = nn.Linear(arch.hidden, q_width + 2 * kv_width, bias=arch.bias)
        else:
            self.q_proj = nn.Linear(arch.hidden, q_width, bias=arch.bias)
            self.k_proj = nn.Linear(arch.hidden, kv_width, bias=arch.bias)
            self.v_proj = nn.Linear(arch.hidden, kv_width, bias=arch.bias)
        self.o_proj = nn.Linear(q_width, arch.hidden, bias=arch.bias)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        if self.reshape_by == "view":
            x = x.view(b, t, heads, self.head_dim)
        elif self.reshape_by == "reshape":
            x = x.reshape(b, t, heads, self.head_dim)
        else:
            x = x.unflatten(-1, (heads, self.head_dim))
        return x.transpose(1, 2)

    def share_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(b, kv_heads, t, d) -> (b, heads, t, d), each kv head serving its query heads."""
        rep = self.num_heads // self.num_kv_heads
        if rep == 1:
            return x
        if self.share == "repeat":
            return x.repeat_interleave(rep, dim=1)
        b, kv, t, d = x.shape  # HF's repeat_kv
        return x[:, :, None, :, :].expand(b, kv, rep, t, d).reshape(b, kv * rep, t, d)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(b, t, 3 * heads * d) -> q, k, v as (b, heads, t, d), as ModernBERT writes it."""
        b, t, _ = x.shape
        if self.reshape_by == "view":
            x = x.view(b, t, 3, self.num_heads, self.head_dim)
        elif self.reshape_by == "reshape":
            x = x.reshape(b, t, 3, -1, self.head_dim)
        else:
            x = x.unflatten(-1, (3, self.num_heads, self.head_dim))
        if self.packed == "unbind":
            return tuple(z.transpose(1, 2) for z in x.unbind(dim=2))
        x = x.permute(2, 0, 3, 1, 4)  # (3, b, heads, t, d)
        return tuple(x.unbind(0)) if self.packed == "permute" else (x[0], x[1], x[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.packed:
            q, k, v = self.unpack(self.qkv(x))
        elif self.fused:
            q_width = self.num_heads * self.head_dim
            kv_width = self.num_kv_heads * self.head_dim
            if q_width == kv_width:
                q, k, v = self.qkv(x).chunk(3, dim=-1)
            else:
                q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if not self.packed:
            q = self.split_heads(q, self.num_heads)
            k = self.split_heads(k, self.num_kv_heads)
            v = self.split_heads(v, self.num_kv_heads)
        if self.compute == "sdpa" and self.share == "gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        elif self.compute == "sdpa":
            k, v = self.share_kv(k), self.share_kv(v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            k, v = self.share_kv(k), self.share_kv(v)
            if self.compute == "einsum":
                scores = torch.einsum("bhid, bhjd -> bhij", q, k) / math.sqrt(self.head_dim)
            else:
                scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if self.causal:
                mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
                scores = scores + mask
            if self.compute == "einsum":
                y = torch.einsum("...ij,...jd->...id", scores.softmax(dim=-1), v)
            else:
                y = scores.softmax(dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.gated = arch.mlp == "swiglu"
        self.up = nn.Linear(arch.hidden, arch.ffn, bias=arch.bias)
        if self.gated:
            self.gate = nn.Linear(arch.hidden, arch.ffn, bias=arch.bias)
        self.down = nn.Linear(arch.ffn, arch.hidden, bias=arch.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.prenorm = arch.prenorm
        self.norm1 = make_norm(arch.norm, arch.hidden)
        self.attn = Attention(arch)
        self.norm2 = make_norm(arch.norm, arch.hidden)
        self.mlp = MLP(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prenorm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class RandomTransformer(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        if arch.embed:
            self.embed = nn.Embedding(VOCAB, arch.hidden)
        else:
            self.embed = nn.Linear(FEATURES, arch.hidden)
        self.blocks = nn.ModuleList([Block(arch) for _ in range(arch.layers)])
        self.final_norm = make_norm(arch.norm, arch.hidden) if arch.prenorm else nn.Identity()
        self.head = nn.Linear(arch.hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def example_input(arch: Arch, seed: int, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if arch.embed:
        return torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    return torch.randn(batch, SEQ, FEATURES, generator=gen)


@st.composite
def architectures(draw: st.DrawFn) -> Arch:
    heads = draw(st.integers(1, 6))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    compute = draw(st.sampled_from(["sdpa", "matmul", "einsum"]))
    shares = ["gqa", "repeat", "expand"] if compute == "sdpa" else ["repeat", "expand"]
    return Arch(
        hidden=draw(st.integers(4, 16)),
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.integers(2, 6)),
        ffn=draw(st.integers(2, 12)),
        fused=draw(st.booleans()),
        share=draw(st.sampled_from(shares)),
        compute=compute,
        causal=draw(st.booleans()),
        reshape=draw(st.sampled_from(["view", "reshape", "unflatten"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm", "manual_rms"])),
        prenorm=draw(st.booleans()),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])),
        bias=draw(st.booleans()),
        embed=draw(st.booleans()),
        packed=draw(st.sampled_from(["", "unbind", "permute", "index"])),
    )


def build(arch: Arch, seed: int) -> RandomTransformer:
    torch.manual_seed(seed)
    return RandomTransformer(arch).eval()


def head_units(arch: Arch) -> int:
    """Units of a layer's head group: one kv head with its query heads; with one kv head
    (multi-query) each query head alone, the shared kv head staying whole."""
    return arch.kv_heads if arch.kv_heads >= 2 else arch.heads


def heads_are_prunable(arch: Arch) -> bool:
    """Whether the engine is expected to find one head group per layer."""
    return head_units(arch) >= 2


def silence_and_remove(arch: Arch, seed: int) -> None:
    """(b): silence a random subset of every head and FFN group, remove exactly those units
    (updating the head-count attributes), and the outputs do not move."""
    model, x = build(arch, seed), example_input(arch, seed)
    graph = build_dependency_graph(model, x)
    gen = torch.Generator().manual_seed(seed)
    removals = []
    for group in graph.groups:
        if group.kind == "hidden" or group.size < 2:
            continue  # norms pool the hidden channels: removing them is not exact by nature
        units = random_units(group, gen)
        silence_(model, group, units)
        if group.kind == "head" and arch.kv_heads == 1:
            silence_readers_(model, group, units)  # the shared value head still reaches o_proj
        removals.append((group, units))
    with torch.no_grad():
        expected = model(x)
    apply_removals_(model, graph, removals)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_ratio_zero_leaves_outputs_identical(arch: Arch, seed: int) -> None:
    model, x = build(arch, seed), example_input(arch, seed)
    with torch.no_grad():
        before = model(x)
    result = prune_(model, StructuredConfig(ratio=0.0), example_inputs=x)
    assert result.removed_units == 0
    with torch.no_grad():
        assert torch.equal(model(x), before)


@settings(max_examples=25, deadline=None)
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_heads_ffn_and_hidden_groups_are_found(arch: Arch, seed: int) -> None:
    model, x = build(arch, seed), example_input(arch, seed)
    groups = build_dependency_graph(model, x).groups
    kinds = [g.kind for g in groups]
    assert kinds.count("hidden") == 1  # the residual stream, shared by every layer
    assert kinds.count("channel") == arch.layers  # FFN width (SwiGLU's gate and up are one)
    if heads_are_prunable(arch):
        assert kinds.count("head") == arch.layers
        assert {g.size for g in groups if g.kind == "head"} == {head_units(arch)}


@settings(max_examples=30, deadline=None)
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_silenced_heads_and_neurons_are_removed_exactly(arch: Arch, seed: int) -> None:
    silence_and_remove(arch, seed)


@settings(max_examples=30, deadline=None)
@given(
    arch=architectures(),
    seed=st.integers(0, 2**16),
    ratio=st.floats(0.2, 0.7, exclude_max=True),
)
def test_any_ratio_prunes_whole_heads_and_costs_less(arch: Arch, seed: int, ratio: float) -> None:
    model, x = build(arch, seed), example_input(arch, seed)
    before = count_macs(model, x).dense
    result = prune_(model, StructuredConfig(ratio=ratio), example_inputs=x)
    assert result.refused == ()
    groups = result.graph.groups
    assert result.widths == tuple((g.size, units_to_keep(g.size, ratio, 1)) for g in groups)
    assert result.removed_units > 0  # the hidden size alone (>= 4 wide) loses one
    with torch.no_grad():
        assert model(x).shape == (2, SEQ, CLASSES)
    assert count_macs(model, x).dense < before
    rep = arch.heads // arch.kv_heads
    for i, block in enumerate(model.blocks):
        attn, name = block.attn, f"blocks.{i}.attn"
        kept = {
            after
            for g, (_, after) in zip(groups, result.widths, strict=True)
            if g.kind == "head" and f"{name}.o_proj" in g.module_names()
        }
        units = kept.pop() if kept else head_units(arch)
        if arch.kv_heads == 1:  # multi-query: the query heads go, the shared kv head stays
            assert (attn.num_kv_heads, attn.num_heads) == (1, units)
        else:
            assert (attn.num_kv_heads, attn.num_heads) == (units, units * rep)
        assert attn.head_dim == arch.head_dim  # whole heads went, none lost a dim
        q_width, kv_width = attn.num_heads * arch.head_dim, attn.num_kv_heads * arch.head_dim
        if arch.fused:
            assert attn.qkv.out_features == q_width + 2 * kv_width
        else:
            assert attn.q_proj.out_features == q_width
            assert attn.k_proj.out_features == attn.v_proj.out_features == kv_width
        assert attn.o_proj.in_features == q_width
        if attn.num_heads != arch.heads:  # recorded so a saved model reloads
            assert model.secateur_attributes[name]["num_heads"] == attn.num_heads


# -- engine bugs found by the properties above, minimised ------------------------------------
SMALL = Arch(
    hidden=4,
    layers=1,
    heads=2,
    kv_heads=2,
    head_dim=2,
    ffn=2,
    fused=False,
    share="gqa",
    compute="sdpa",
    causal=False,
    reshape="view",
    norm="layernorm",
    prenorm=True,
    mlp="gelu",
    bias=False,
    embed=False,
)


def test_the_minimal_examples_work_when_written_with_view() -> None:
    """The baseline the tests below differ from by one choice each."""
    silence_and_remove(SMALL, 0)
    silence_and_remove(replace(SMALL, heads=6, kv_heads=2), 0)  # GQA without the collision


def test_heads_split_by_unflatten_are_removed_exactly() -> None:
    silence_and_remove(replace(SMALL, reshape="unflatten"), 0)


def test_gqa_keeping_as_many_query_heads_as_kv_heads_is_exact() -> None:
    silence_and_remove(replace(SMALL, heads=4, kv_heads=2), 0)


def test_gqa_by_repeat_interleave_finds_head_groups() -> None:
    arch = replace(SMALL, heads=4, kv_heads=2, share="repeat")
    graph = build_dependency_graph(build(arch, 0), example_input(arch, 0))
    assert [g.size for g in graph.groups if g.kind == "head"] == [2]


@pytest.mark.parametrize("reshape", ["view", "reshape", "unflatten"])
@pytest.mark.parametrize("compute", ["sdpa", "matmul", "einsum"])
@pytest.mark.parametrize("packed", ["unbind", "permute", "index"])
def test_q_k_v_packed_as_three_by_heads_lose_whole_heads(
    reshape: str, compute: str, packed: str
) -> None:
    """ModernBERT's layout, one q|k|v projection viewed as (3, heads, head_dim) and unbound,
    and timm's and torchvision Swin's, the same permuted to put the 3 in front: a unit is one
    head of each of q, k and v, and the head count in the view follows."""
    arch = replace(
        SMALL, heads=3, kv_heads=3, fused=True, packed=packed, reshape=reshape, compute=compute
    )
    arch = replace(arch, share="repeat") if compute != "sdpa" else arch
    silence_and_remove(arch, 0)
    model, x = build(arch, 0), example_input(arch, 0)
    assert [g.size for g in build_dependency_graph(model, x).groups if g.kind == "head"] == [3]
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    attn = model.blocks[0].attn
    assert attn.qkv.out_features == 3 * attn.num_heads * arch.head_dim
    assert attn.num_heads == attn.num_kv_heads < 3
