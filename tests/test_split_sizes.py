"""A split whose sizes an attribute holds whole (InceptionNeXt's ``split_indexes``, FocalNet's
``input_split``): after pruning the attribute holds each piece's new width, in its own type,
and a saved model reloads with it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur import ArtifactError, load_model, save_model
from secateur.graph import build_dependency_graph
from secateur.pruning import StructuredConfig, prune_
from secateur.zoo import register_model
from secateur.zoo._registry import _REGISTRY
from structured_helpers import assert_silenced_removal_exact


class InceptionMixer(nn.Module):
    """InceptionNeXt's token mixer: an identity part and three depthwise branches, cut by a
    tuple attribute of four sizes and concatenated again."""

    def __init__(self, width: int, branch: int) -> None:
        super().__init__()
        self.split_indexes = (width - 3 * branch, branch, branch, branch)
        self.hw = nn.Conv2d(branch, branch, 3, padding=1, groups=branch)
        self.w = nn.Conv2d(branch, branch, (1, 3), padding=(0, 1), groups=branch)
        self.h = nn.Conv2d(branch, branch, (3, 1), padding=(1, 0), groups=branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.hw(x_hw), self.w(x_w), self.h(x_h)), dim=1)


class FocalMixer(nn.Module):
    """FocalNet's modulation, shortened: one conv writes queries, context and gates, cut by a
    list attribute; ``dim``, equal to two of the sizes, is not what the split reads."""

    def __init__(self, dim: int, levels: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.input_split = [dim, dim, levels]
        self.f = nn.Conv2d(dim, 2 * dim + levels, 1)
        self.focal = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.h = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, ctx, gates = torch.split(self.f(x), self.input_split, 1)
        ctx = self.focal(ctx)
        ctx_all = ctx * gates[:, :1] + ctx.mean((2, 3), keepdim=True) * gates[:, 1:]
        return self.proj(q * self.h(ctx_all))


class Net(nn.Module):
    def __init__(self, mixer: str, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.up = nn.Conv2d(width, width, 1)
        self.mixer = InceptionMixer(width, 4) if mixer == "inception" else FocalMixer(width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.mixer(torch.relu(self.up(h))))


def _net(*, mixer: str = "inception") -> nn.Module:
    return Net(mixer)


@pytest.fixture
def registered() -> Iterator[Callable[..., nn.Module]]:
    """``_net`` in the zoo for the test's length only: other tests list every zoo model."""
    factory = register_model("test_split_sizes")(_net)
    yield factory
    _REGISTRY.pop("test_split_sizes")


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def test_inception_split_sizes_become_the_pieces_new_widths() -> None:
    torch.manual_seed(0)
    model = Net("inception").eval()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert result.refused == ()
    sizes = model.mixer.split_indexes
    assert type(sizes) is tuple and sizes[0] == model.up.out_channels - 3 * sizes[1]
    assert sizes[1:] == (
        model.mixer.hw.in_channels,
        model.mixer.w.in_channels,
        model.mixer.h.in_channels,
    )
    assert sum(sizes) < 16
    assert model(_x()).shape == (2, 3)
    assert model.secateur_attributes["mixer"] == {"split_indexes": list(sizes)}


def test_focal_split_keeps_its_list_and_leaves_the_unread_int_alone() -> None:
    torch.manual_seed(0)
    model = Net("focal").eval()
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    assert result.refused == ()
    mixer = model.mixer
    assert mixer.input_split == [mixer.h.in_channels, mixer.focal.in_channels, 2]
    assert mixer.input_split[0] < 16 and mixer.dim == 16  # not read by the split
    assert model(_x()).shape == (2, 3)


@pytest.mark.parametrize("mixer", ["inception", "focal"])
@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_units_of_the_pieces_are_removed_exactly(mixer: str, seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(Net(mixer).eval(), _x(), seed)


def test_the_sizes_are_noted_with_their_entries() -> None:
    graph = build_dependency_graph(Net("inception").eval(), _x())
    noted = {(a.entry, a.value) for a in graph.attributes if a.module_name == "mixer"}
    assert noted == {(0, 4), (1, 4), (2, 4), (3, 4)}
    assert {a.sizes for a in graph.attributes if a.module_name == "mixer"} == {(4, 4, 4, 4)}


@pytest.mark.parametrize("mixer", ["inception", "focal"])
def test_a_pruned_model_reloads_with_its_split_sizes(
    mixer: str, tmp_path: Path, registered: Callable[..., nn.Module]
) -> None:
    torch.manual_seed(0)
    model = registered(mixer=mixer).eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    path = save_model(model, tmp_path / "split.safetensors")
    loaded = load_model(path).model.eval()
    attr = "split_indexes" if mixer == "inception" else "input_split"
    assert getattr(loaded.mixer, attr) == getattr(model.mixer, attr)
    assert type(getattr(loaded.mixer, attr)) is type(getattr(model.mixer, attr))
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"split_indexes": [4, 4, 4]}, "no sizes attribute 'split_indexes' of 3 entries"),
        ({"hw": [1, 2]}, "no sizes attribute 'hw'"),
        ({"split_indexes": [4, -1, 4, 4]}, "non-negative integers"),
        ({"split_indexes": [4, True, 4, 4]}, "non-negative integers"),
    ],
    ids=["length", "not-sizes", "negative", "bool"],
)
def test_a_bad_sizes_edit_is_an_artifact_error(
    edit: dict, match: str, tmp_path: Path, registered: Callable[..., nn.Module]
) -> None:
    model = registered().eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_x())
    path = save_model(model, tmp_path / "split.safetensors")
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest["edits"]["attributes"] = {"mixer": edit}
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match) as exc:
        load_model(path)
    assert "\n" not in str(exc.value)


class C2f(nn.Module):
    """YOLOv8's C2f block: one conv's output cut in two equal halves, by ``chunk(2, 1)`` or by
    ``split((self.c, self.c), 1)``; each bottleneck reads the last piece, all are concatenated."""

    def __init__(self, width: int, cut: str, n: int = 2) -> None:
        super().__init__()
        self.c, self.cut = width // 2, cut
        self.cv1 = nn.Conv2d(width, 2 * self.c, 1)
        self.cv2 = nn.Conv2d((2 + n) * self.c, width, 1)
        self.m = nn.ModuleList(
            nn.Sequential(nn.Conv2d(self.c, self.c, 3, padding=1), nn.SiLU()) for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        pieces = list(y.chunk(2, 1) if self.cut == "chunk" else y.split((self.c, self.c), 1))
        pieces.extend(m(pieces[-1]) for m in self.m)
        return self.cv2(torch.cat(pieces, 1))


def _yolo(cut: str) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        C2f(16, cut),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


@pytest.mark.parametrize("cut", ["chunk", "split"])
def test_equal_halves_keep_equal_widths_under_a_global_ranking(cut: str) -> None:
    torch.manual_seed(0)
    model = _yolo(cut)
    graph = build_dependency_graph(model, _x())
    halves = [g for g in graph.groups if "1.cv1" in g.producers() and g.size == 8]
    assert len(halves) == 1  # both halves of cv1's output: one group, sliced at two offsets
    config = StructuredConfig(ratio=0.5, scope="global")
    result = prune_(model, config, example_inputs=_x())
    assert result.refused == ()
    block = model[1]
    assert block.cv1.out_channels == 2 * block.m[0][0].in_channels < 16
    if cut == "split":  # the attribute the sizes were written with follows
        assert block.c == block.m[0][0].in_channels
    assert model(_x()).shape == (2, 4)


@pytest.mark.parametrize("cut", ["chunk", "split"])
@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_units_of_equal_halves_are_removed_exactly(cut: str, seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(_yolo(cut), _x(), seed)


class CrossStage(nn.Module):
    """CSPDarknet's stage: the expanded channels cut in halves by ``split(self.expand_chs //
    2)``; no attribute holds the half itself."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.expand_chs = 2 * width
        self.conv_exp = nn.Conv2d(width, self.expand_chs, 1)
        self.block = nn.Conv2d(width, width, 3, padding=1)
        self.transition = nn.Conv2d(self.expand_chs, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.transition(torch.cat([xs, torch.relu(self.block(xb))], dim=1))


def _csp() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        CrossStage(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()


def test_an_attribute_holding_a_multiple_of_the_split_size_is_scaled() -> None:
    torch.manual_seed(0)
    model = _csp()
    result = prune_(model, StructuredConfig(ratio=0.5, scope="global"), example_inputs=_x())
    assert result.refused == ()
    stage = model[1]
    assert stage.expand_chs == stage.conv_exp.out_channels == 2 * stage.block.in_channels < 16
    assert model.secateur_attributes["1"] == {"expand_chs": stage.expand_chs}


@pytest.mark.parametrize("seed", [0, 1])
def test_silenced_units_of_the_scaled_halves_are_removed_exactly(seed: int) -> None:
    torch.manual_seed(seed)
    assert_silenced_removal_exact(_csp(), _x(), seed)
