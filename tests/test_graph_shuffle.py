"""Channel shuffle (ShuffleNet): ``view(b, g, c // g, h, w)``, ``transpose(1, 2)``,
``view(b, c, h, w)`` deals the channels of g blocks out in turn. The blocks must lose the same
positions, and each later shuffle makes the units span twice as many channels; a grouped view
read any other way keeps whole groups as units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from structured_helpers import assert_silenced_removal_exact, randomise_norms


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


def _branch(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False),
        nn.BatchNorm2d(cout),
        nn.Conv2d(cout, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class _Unit(nn.Module):
    """ShuffleNetV2's unit: the first has two branches, the others pass half the channels
    through (``chunk``) and transform the other half; the output is shuffled."""

    def __init__(self, cin: int, width: int, first: bool) -> None:
        super().__init__()
        half = width // 2
        self.first = first
        if first:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU()
            )
        self.branch2 = _branch(cin if first else half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        else:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        return self.shuffle(out)

    def shuffle(self, out: torch.Tensor) -> torch.Tensor:
        return _shuffle(out, 2)


class _MiniShuffleNet(nn.Module):
    def __init__(self, width: int, units: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(
            _Unit(16, width, True), *[_Unit(width, width, False) for _ in range(units - 1)]
        )
        self.head = nn.Sequential(nn.Conv2d(width, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.stage(self.stem(x))).mean((2, 3)))


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _trunk(model: nn.Module):  # noqa: ANN202
    graph = build_dependency_graph(model, _images())
    (trunk,) = [g for g in graph.groups if "head.0" in g.module_names() and g.size < 32]
    return graph, trunk


@pytest.mark.parametrize(("width", "units", "size"), [(64, 4, 4), (48, 3, 6), (40, 2, 10)])
def test_the_shuffled_trunk_is_one_group_of_ever_wider_units(
    width: int, units: int, size: int
) -> None:
    """Half the width after the first unit, halved again by each later chunk: 64 channels
    over 4 units are 4 units of 16 channels."""
    model = _MiniShuffleNet(width, units).eval()
    graph, trunk = _trunk(model)
    assert trunk.size == size
    names = set(trunk.module_names())
    assert {"stage.0.branch1.0", "stage.0.branch2.5", "head.0"} <= names
    assert {f"stage.{i}.branch2.0" for i in range(1, units)} <= names  # reads the chunk
    assert {f"stage.{i}.branch2.5" for i in range(1, units)} <= names  # writes the other half
    assert [r for _, r in graph.blocked if "shuffle" in r or "chunk" in r] == []


@pytest.mark.parametrize(("width", "units"), [(64, 4), (48, 3)])
def test_removing_silenced_trunk_units_keeps_outputs(width: int, units: int) -> None:
    torch.manual_seed(0)
    model = _MiniShuffleNet(width, units).eval()
    randomise_norms(model)
    removals = assert_silenced_removal_exact(model, _images(), seed=1)
    assert any(g.size < 32 and "head.0" in g.module_names() for g, _ in removals)


def test_pruned_shufflenet_runs_with_a_narrower_trunk() -> None:
    model = _MiniShuffleNet(64, 4).eval()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_images())
    assert result.refused == ()
    assert model.head[0].in_channels == 32 and model(_images()).shape == (2, 5)


def test_a_trunk_the_chunks_cannot_halve_stays_whole() -> None:
    """24 channels: units of 2, then 4, then a chunk of 12 would cut a unit of 8 in two."""
    model = _MiniShuffleNet(24, 4).eval()
    graph = build_dependency_graph(model, _images())
    assert not [g for g in graph.groups if "head.0" in g.module_names() and g.size < 32]
    assert any("head.0" in names for names, _ in graph.blocked)


class _GroupStatistics(nn.Module):
    """A group norm written by hand: the grouped view is reduced, not transposed, so each
    group is a unit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.groups = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, c, hh, ww = h.shape
        g = h.view(b, self.groups, c // self.groups, hh, ww)
        g = (g - g.mean((2, 3, 4), keepdim=True)) / (g.std((2, 3, 4), keepdim=True) + 1e-5)
        return self.out(torch.relu(g.view(b, c, hh, ww)))


def test_a_grouped_view_read_otherwise_keeps_whole_groups() -> None:
    model = _GroupStatistics().eval()
    graph = build_dependency_graph(model, _images())
    assert [g.size for g in graph.groups] == [4]
    assert_silenced_removal_exact(model, _images())
    assert model.groups < 4 and model.conv.out_channels == 4 * model.groups


def test_torchvision_shufflenet_prunes_its_last_stage_trunk_exactly() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    randomise_norms(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(model, x)
    trunks = [g for g in graph.groups if "stage4.0.branch1.2" in g.module_names()]
    assert [g.size for g in trunks] == [12]  # 192 channels in units of 16
    assert "conv5.0" in trunks[0].module_names()
    assert_silenced_removal_exact(model, x, seed=2)


class _SpelledUnit(_Unit):
    """The shuffle's view spells the per-group width held in an attribute."""

    def __init__(self, cin: int, width: int, first: bool) -> None:
        super().__init__(cin, width, first)
        self.groups, self.per = 2, width // 2

    def shuffle(self, out: torch.Tensor) -> torch.Tensor:
        b, c, h, w = out.shape
        out = torch.transpose(out.view(b, self.groups, self.per, h, w), 1, 2).contiguous()
        return out.view(b, c, h, w)


def test_a_per_group_width_held_in_an_attribute_follows_the_pruned_trunk() -> None:
    model = _MiniShuffleNet(64, 4).eval()
    model.stage = nn.Sequential(
        _SpelledUnit(16, 64, True), *[_SpelledUnit(64, 64, False) for _ in range(3)]
    )
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_images())
    assert result.refused == ()
    assert [unit.per for unit in model.stage] == [16] * 4 and model(_images()).shape == (2, 5)
