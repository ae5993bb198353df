"""Property tests: on random architectures, removing silenced units never changes outputs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.measure import count_macs
from secateur.pruning._surgery import remove_units_
from structured_helpers import random_units, randomise_norms, silence_

BLOCKS = ("plain", "residual", "concat", "grouped", "depthwise", "flatten_head")


class RandomNet(nn.Module):
    """A CNN assembled from a list of block kinds and widths; forward runs it as Python."""

    def __init__(self, blocks: list[tuple[str, int]]) -> None:
        super().__init__()
        self.kinds = []
        self.layers = nn.ModuleList()
        c = 4
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.flat_head = False
        for kind, width in blocks:
            if kind == "plain":
                layer = nn.Sequential(
                    nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
                )
                c = width
            elif kind == "residual":
                layer = nn.Sequential(
                    nn.Conv2d(c, width, 3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                    nn.Conv2d(width, c, 3, padding=1),
                    nn.BatchNorm2d(c),
                )
            elif kind == "concat":
                layer = nn.ModuleList(
                    [nn.Conv2d(c, width, 1), nn.Conv2d(c, width + 1, 3, padding=1)]
                )
                c = 2 * width + 1
            elif kind == "grouped":
                layer = nn.Sequential(
                    nn.Conv2d(c, 2 * c, 3, padding=1, groups=c if c % 2 else 2), nn.ReLU()
                )
                c = 2 * c
            elif kind == "depthwise":
                layer = nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.Hardswish()
                )
            else:
                self.flat_head = True
                continue
            self.kinds.append(kind)
            self.layers.append(layer)
        self.head = nn.Linear(c * 16 if self.flat_head else c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind == "residual":
                x = (x + layer(x)).relu()
            elif kind == "concat":
                x = torch.cat([layer[0](x), layer[1](x)], dim=1)
            else:
                x = layer(x)
        if self.flat_head:
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))
        return self.head(x.mean(dim=(2, 3)))


architectures = st.lists(
    st.tuples(st.sampled_from(BLOCKS), st.integers(2, 6)), min_size=1, max_size=6
)


@settings(max_examples=30, deadline=None)
@given(blocks=architectures, seed=st.integers(0, 2**16))
def test_silenced_units_are_removed_exactly(blocks: list[tuple[str, int]], seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomNet(blocks).eval()
    randomise_norms(model)
    x = torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    gen = torch.Generator().manual_seed(seed)
    removals = [(g, random_units(g, gen)) for g in graph.groups if g.size > 1]
    for group, units in removals:
        silence_(model, group, units)
    expected = model(x)
    remove_units_(model, removals)
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(blocks=architectures, ratio=st.floats(0.1, 0.9))
def test_any_ratio_gives_a_runnable_no_larger_model(
    blocks: list[tuple[str, int]], ratio: float
) -> None:
    model = RandomNet(blocks).eval()
    x = torch.randn(1, 3, 8, 8)
    before = count_macs(model, x).dense
    prune_(model, StructuredConfig(ratio=ratio), example_inputs=x)
    assert model(x).shape == (1, 5)
    assert count_macs(model, x).dense <= before
