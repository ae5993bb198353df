"""Conv layers beyond nn.Conv2d's own: subclasses with a per-filter gain and weight
standardisation (timm's ScaledStdConv2d in NFNets, StdConv2d in BiT), one with a tensor the
surgery cannot cut, and ECA's Conv1d sliding along the pooled channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph import build_dependency_graph
from secateur.pruning import StructuredConfig, prune_
from structured_helpers import assert_silenced_removal_exact


class ScaledStdConv(nn.Conv2d):
    """Each filter standardised over its inputs, then scaled by its own gain (NFNet)."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class PlanarConv(nn.Conv2d):
    """A conv with a tensor of its own that is not one value per filter."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 1)
        self.mix = nn.Parameter(torch.randn(cout, cin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.mix[:, :, None, None], self.bias)


class Eca(nn.Module):
    """Efficient channel attention: a Conv1d of kernel 3 over the pooled channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        return x * torch.sigmoid(self.conv(y)).view(x.shape[0], -1, 1, 1)


def _net(kind: str) -> nn.Module:
    conv = {"std": ScaledStdConv, "planar": PlanarConv}.get(
        kind, lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1)
    )
    layers: list[nn.Module] = [conv(3, 8), nn.ReLU(), conv(8, 12), nn.ReLU()]
    if kind == "eca":
        layers.append(Eca())
    layers += [nn.Conv2d(12, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)]
    return nn.Sequential(*layers).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def test_a_gain_per_filter_is_cut_with_the_filters_and_standardised_inputs_are_pooled() -> None:
    torch.manual_seed(0)
    model = _net("std")
    graph = build_dependency_graph(model, _x())
    kinds = {g.producers()[0]: (g.kind, g.size) for g in graph.groups}
    # the 8 channels the second standardised conv reads: removing one moves its statistics
    assert kinds == {"0": ("hidden", 8), "2": ("channel", 12), "4": ("channel", 6)}
    gains = [m for g in graph.groups for m in g.members if m.tensor == "gain"]
    assert {(m.module_name, m.dim) for m in gains} == {("0", 0), ("2", 0)}
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert result.refused == ()
    assert model[2].gain.shape == (model[2].out_channels, 1, 1, 1)
    assert model[2].out_channels < 12 and model[0].out_channels < 8
    assert model(_x()).shape == (2, 4)


@pytest.mark.parametrize("kind", ["std", "eca"])
@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_filters_are_removed_exactly(kind: str, seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(_net(kind), _x(), seed)


def test_a_tensor_not_per_filter_leaves_the_layer_whole() -> None:
    graph = build_dependency_graph(_net("planar"), _x())
    reasons = dict(graph.blocked)
    assert reasons["0, 2"] == "0.mix of shape (8, 3) is not one value per filter"
    assert reasons["2, 4"] == "2.mix of shape (12, 8) is not one value per filter"
    assert [g.producers() for g in graph.groups] == [["4"]]


def test_eca_conv_along_the_channels_passes_them_through_pooled() -> None:
    torch.manual_seed(0)
    model = _net("eca")
    graph = build_dependency_graph(model, _x())
    kinds = {g.producers()[0]: g.kind for g in graph.groups}
    assert kinds == {"0": "channel", "2": "hidden", "5": "channel"}
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert result.refused == ()
    assert model[2].out_channels < 12 and model[5].in_channels == model[2].out_channels
    assert model(_x()).shape == (2, 4)


def test_timm_standardised_convs_prune() -> None:
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(
        layers.StdConv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        layers.ScaledStdConv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        layers.EcaModule(channels=12),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    ).eval()
    graph = build_dependency_graph(model, _x())
    assert graph.blocked == (("0", "model input"), ("7", "model output"))
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert result.refused == ()
    assert model[2].gain.shape[0] == model[2].out_channels < 12
    assert model(_x()).shape == (2, 4)
