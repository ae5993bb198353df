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
