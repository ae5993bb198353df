"""Rules a state-space layer needs (Mamba's mixer): a depthwise conv run functionally with a
layer's weight, a parameter matrix times a tensor, a sum against an axis of fixed width, and
an outer product of two channel axes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from structured_helpers import assert_silenced_removal_exact

INNER, STATE = 12, 4


def _x() -> torch.Tensor:
    return torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0))


class Scan(nn.Module):
    """A Mamba-like mixer: ``in_proj`` makes x and a gate, a causal depthwise conv filters x
    (through ``F.conv1d`` with the conv layer's weight, or with a bare parameter), a step
    size made by a parameter matrix (``dt_weight @ r``), a state that sums against ``c``
    over its own axis, and ``out_proj`` reads the gated result."""

    def __init__(self, bare_conv: bool = False) -> None:
        super().__init__()
        self.in_proj = nn.Linear(8, 2 * INNER)
        self.conv = nn.Conv1d(INNER, INNER, 3, groups=INNER, padding=2)
        self.bare = nn.Parameter(torch.randn(INNER, 1, 3)) if bare_conv else None
        self.rank, self.state = 2, STATE
        self.x_proj = nn.Linear(INNER, 2 + STATE)
        self.dt_weight = nn.Parameter(torch.randn(INNER, 2) * 0.3)
        self.out_proj = nn.Linear(INNER, 8)

    def conv_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv.weight, self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (b, inner, t) each
        weight, bias = (self.bare, None) if self.bare is not None else self.conv_tensors()
        h = F.conv1d(h, weight, bias, padding=2, groups=h.shape[1])[..., :t]
        r, c = self.x_proj(h.transpose(1, 2)).split([self.rank, self.state], dim=-1)
        dt = F.softplus(self.dt_weight @ r.transpose(1, 2))  # (b, inner, t)
        state = dt[..., None] * c[:, None, :, :]  # (b, inner, t, state): an outer product
        y = torch.matmul(state.sum(2), c[:, 0, :, None])[..., 0]  # (b, inner)
        out = (h + y[..., None]) * F.silu(gate)  # a silenced gate zeroes its channel
        return self.out_proj(out.transpose(1, 2))


def _inner(graph) -> list:  # noqa: ANN001
    return [g for g in graph.groups if any(m.module_name == "out_proj" for m in g.members)]


@pytest.mark.parametrize("bare_conv", [False, True])
def test_a_mamba_like_mixer_loses_inner_channels_exactly(bare_conv: bool) -> None:
    model = Scan(bare_conv).eval()
    graph = build_dependency_graph(model, _x())
    (inner,) = _inner(graph)
    names = {(m.module_name, m.role, m.tensor) for m in inner.members}
    assert ("", "param_out", "dt_weight") in names  # the matrix's rows write the channels
    conv = ("conv", "depthwise", "") if not bare_conv else ("", "param", "bare")
    assert conv in names
    # c's channels meet the state outside the inner channels: they stay whole
    assert any(names == "x_proj" for names, _ in graph.blocked)
    assert_silenced_removal_exact(model, _x())


def test_the_depthwise_layer_run_functionally_keeps_its_attributes_true() -> None:
    model = Scan().eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    kept = model.conv.weight.shape[0]
    assert kept < INNER
    assert model.conv.groups == model.conv.in_channels == model.conv.out_channels == kept
    assert model(_x()).shape == (2, 7, 8)


class ParameterProducts(nn.Module):
    """``x @ W`` and ``W @ x`` with bare parameter matrices: linear layers written out."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 6)
        self.right = nn.Parameter(torch.randn(6, 5))
        self.left = nn.Parameter(torch.randn(4, 5))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.first(x)) @ self.right  # (b, t, 5)
        g = F.relu(self.left @ h.transpose(1, 2))  # (b, 4, t)
        return self.head(g.transpose(1, 2))


def test_parameter_matrices_multiplied_by_hand_read_and_write_channels() -> None:
    model = ParameterProducts().eval()
    graph = build_dependency_graph(model, _x())
    members = {(m.module_name, m.tensor, m.dim) for g in graph.groups for m in g.members}
    assert {("", "right", 0), ("", "right", 1), ("", "left", 1), ("", "left", 0)} <= members
    assert_silenced_removal_exact(model, _x())


HEADS, HEAD_DIM, CHUNK = 5, 3, 3  # not STATE: equal sizes in one split are tied


class ChunkedScan(nn.Module):
    """A Mamba2-like mixer: x split into heads, a step size and decay per head, and one
    group's state (``b``, ``c``) repeated over every head (``repeat_interleave`` from a group
    axis of one entry), mixed with the heads by einsums over chunks as Mamba2's chunked scan
    does."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(8, 2 * HEADS * HEAD_DIM + 2 * STATE + HEADS)
        self.a_log = nn.Parameter(torch.rand(HEADS))
        self.d = nn.Parameter(torch.randn(HEADS))
        self.out_proj = nn.Linear(HEADS * HEAD_DIM, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, t, _ = x.shape
        inner, heads = self.out_proj.in_features, self.a_log.shape[0]
        gate, h, b, c, dt = self.in_proj(x).split([inner, inner, STATE, STATE, heads], dim=-1)
        h = h.view(bsz, t, -1, HEAD_DIM)  # (b, t, heads, p)
        b = b.view(bsz, t, 1, STATE).repeat_interleave(heads, dim=2, output_size=heads)
        c = c.view(bsz, t, 1, STATE).repeat_interleave(heads, dim=2, output_size=heads)
        dt = F.softplus(dt)  # (b, t, heads)
        a = -torch.exp(self.a_log) * dt  # (b, t, heads)
        chunks = lambda v: v.reshape(bsz, -1, CHUNK, *v.shape[2:])  # noqa: E731
        hc, bc, cc, ac = chunks(h * dt[..., None]), chunks(b), chunks(c), chunks(a)
        decay = torch.exp(torch.cumsum(ac, dim=2))  # (b, n, l, heads)
        scores = torch.einsum("bnlhs,bnmhs->bnlmh", cc, bc)  # the state summed away
        y = torch.einsum("bnlmh,bnmhp->bnlhp", scores * decay[:, :, None], hc)
        states = torch.einsum("bnlhs,bnlhp->bnhps", bc * decay[..., None], hc)
        y = y + torch.einsum("bnlhs,bnhps->bnlhp", cc, states.cumsum(1))
        y = y.reshape(bsz, t, heads, HEAD_DIM) + self.d[:, None] * h
        return self.out_proj(y.reshape(bsz, t, -1) * F.silu(gate))


def test_heads_beside_a_state_repeated_over_them_are_units() -> None:
    model = ChunkedScan().eval()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(model, x)
    (heads,) = _inner(graph)
    assert heads.size == HEADS
    assert {("", "a_log"), ("", "d")} <= {(m.module_name, m.tensor) for m in heads.members}
    # the state is shared by every head: its own channels stay whole
    assert ("in_proj", "summed against another's channels") in graph.blocked
    assert_silenced_removal_exact(model, x)


class GateOnly(nn.Module):
    """Mamba2's gated RMSNorm without its statistics (which pool over the heads and make
    removal inexact by nature): the weight times the gated value."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.weight * (hidden * F.silu(gate))


@pytest.mark.parametrize("groups", [1, 2])
def test_hf_mamba2_heads_are_removed_exactly(groups: int) -> None:
    """Transformers' Mamba2: with one group of state, single heads are units; with several,
    each group with its heads is one."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Mamba2Config(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, num_heads=4,
        head_dim=8, n_groups=groups, expand=2, chunk_size=3, conv_kernel=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(config).eval()
    for layer in model.backbone.layers:
        layer.mixer.norm = GateOnly(layer.mixer.norm.weight)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(model, ids)
    inner = [g for g in graph.groups if any(m.module_name.endswith("out_proj") for m in g.members)]
    assert sorted(g.size for g in inner if g.kind != "hidden") == [4 // groups] * 2
    removals = assert_silenced_removal_exact(model, ids)
    assert any("mixer.in_proj" in m.module_name for g, _ in removals for m in g.members)


class ScaledByCopies(nn.Module):
    """Channels times an untracked factor made in one of several ways: copies of one value
    over the channel axis (kept prunable), or a factor that only looks so (a diagonal of
    copies, a pool or an in-place write across the copies; all keep the channels whole)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin, self.out = nn.Linear(8, 6), nn.Linear(6, 8)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.lin(inp)
        width = x.shape[-1]
        base = inp.detach().pow(2).sum(-1, keepdim=True) + 1.0  # (b, 1), no channels
        copies = base.repeat_interleave(width, dim=1)
        if self.how == "diagonal":  # a value per channel, read off copies along another axis
            factor = torch.einsum("hh->h", (torch.arange(width) + 1.0)[None].expand(width, -1))
        elif self.how == "pooled":  # the edges average fewer entries
            factor = F.avg_pool1d(copies[:, None], 3, 1, 1)[:, 0]
        elif self.how == "written in place":  # by name, without the trailing "_"
            F.threshold(copies[:, :2], 1e9, 0.0, inplace=True)
            factor = copies
        elif self.how == "written in place, positionally":
            factor = (-base).repeat_interleave(width, dim=1)
            F.relu(factor[:, :2], True)
        else:
            factor = copies
        return self.out(x * factor)


def test_copies_of_one_value_over_the_channels_leave_them_prunable() -> None:
    model = ScaledByCopies("copies").eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    (group,) = build_dependency_graph(model, x).groups
    assert {m.module_name for m in group.members} == {"lin", "out"}
    assert_silenced_removal_exact(model, x)


@pytest.mark.parametrize(
    "how", ["diagonal", "pooled", "written in place", "written in place, positionally"]
)
def test_factors_that_only_look_like_copies_keep_the_channels_whole(how: str) -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(ScaledByCopies(how).eval(), x)
    assert graph.groups == ()
    assert ("lin, out", "scaled by a constant with a value per channel") in graph.blocked


class DeltaRule(nn.Module):
    """A Gated-DeltaNet-like mixer (Qwen3.5's linear attention): per head, a lower-triangular
    system solved against the values (``linalg.solve_triangular``), a recurrent state that
    starts as zeros made with the head count read off a shape, and a per-head norm over
    (batch * tokens * heads, head_dim) rows before the heads are merged back."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 12)
        self.head_dim = 3
        self.norm_weight = nn.Parameter(torch.rand(3) + 0.5)
        self.out_proj = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        system = (k @ k.transpose(-1, -2)).tril(-1) * 0.1 + torch.eye(t)  # (b, heads, t, t)
        values = torch.linalg.solve_triangular(system, v, upper=False, unitriangular=True)
        state = torch.zeros(b, v.shape[1], self.head_dim, self.head_dim)
        out = q @ state + (q @ k.transpose(-1, -2)).tril() @ values
        rows = out.transpose(1, 2).reshape(-1, self.head_dim)  # (b * t * heads, head_dim)
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        return self.out_proj(rows.reshape(b, t, -1))


def test_heads_through_a_triangular_solve_and_a_per_head_norm_are_units() -> None:
    model = DeltaRule().eval()
    graph = build_dependency_graph(model, _x())
    (heads,) = _inner(graph)
    assert heads.size == 4 and heads.kind == "head"
    assert {"q", "k", "v"} <= {m.module_name for m in heads.members}
    assert_silenced_removal_exact(model, _x())


@pytest.mark.parametrize(
    ("src", "dst", "between"),
    [
        ((64, 8), (2, 8, 32), (2, 8, 4, 8)),
        ((4, 6), (2, 12), (2, 2, 6)),
        ((6, 4), (4, 6), None),  # 6 and 4 do not divide each other
        ((2, 1, 8), (16,), None),  # an axis of one entry
        ((2, 0, 8), (0, 6), None),  # no entries
        ((4, 6), (5, 5), None),  # different sizes
    ],
)
def test_the_shape_two_reshapes_merge_from(src: tuple, dst: tuple, between: tuple | None) -> None:
    from secateur.graph._shapes import common_refinement

    assert common_refinement(src, dst) == between


class SolvedFromTheRight(nn.Module):
    """``X A = B`` (``left=False``): each row mixes B's columns, so channels there stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        system = torch.eye(5) + torch.ones(5, 5).tril(-1) * 0.1
        return self.b(torch.linalg.solve_triangular(system, self.a(x), upper=False, left=False))


def test_a_solve_from_the_right_keeps_the_channels_whole() -> None:
    graph = build_dependency_graph(SolvedFromTheRight().eval(), _x())
    assert all(m.module_name != "a" for g in graph.groups for m in g.members)
