"""Grouped convs (ResNeXt, RegNet): every group shrinks alike, so the layer's MACs fall with
both its input and its output channels; a channel multiplier still loses whole groups."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateur import StructuredConfig, create_model, prune_
from secateur.errors import ArtifactError
from secateur.export import load_model, save_model
from secateur.graph import build_dependency_graph, can_shrink_per_group
from secateur.graph._spaces import SpaceTable
from secateur.importance import create_criterion, group_scores
from secateur.measure import count_macs
from secateur.pruning._surgery import resize_to_state_
from structured_helpers import assert_silenced_removal_exact, randomise_norms


def _plain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 8, 1),
    )  # fmt: skip


class Bottleneck(nn.Module):
    """ResNeXt's block: 1x1, grouped 3x3, squeeze-excitation gate, 1x1, added to its input."""

    def __init__(self, c: int = 12, width: int = 24, groups: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, 4, 1), nn.ReLU(), nn.Conv2d(4, width, 1)
        )
        self.conv3 = nn.Sequential(nn.Conv2d(width, c, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return torch.relu(x + self.conv3(y * torch.sigmoid(self.se(y))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.blocks = nn.Sequential(Bottleneck(), Bottleneck())
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _roles(graph, module_name: str) -> set[str]:  # noqa: ANN001
    return {m.role for g in graph.groups for m in g.members if m.module_name == module_name}


def test_every_group_loses_the_same_inputs_and_outputs() -> None:
    torch.manual_seed(0)
    model, x = _plain().eval(), torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    assert _roles(graph, "3") == {"pergroup_in", "pergroup_out"}
    feeding = next(g for g in graph.groups if "0" in g.producers())
    assert feeding.size == 4  # the k-th input of each of the 4 groups is one unit
    reader = next(m for m in feeding.members if m.module_name == "3")
    assert (reader.repeats, reader.period) == (4, 4)
    assert feeding.feature_indices(reader, torch.tensor([1])).tolist() == [1, 5, 9, 13]
    assert feeding.slice_indices(reader, torch.tensor([1])).tolist() == [1]  # in its weight
    grouped_macs = count_macs(model[3], torch.randn(2, 16, 8, 8)).dense
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    conv = model[3]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (8, 16, 4)
    assert conv.weight.shape == (16, 2, 3, 3)
    assert count_macs(conv, torch.randn(2, 8, 8, 8)).dense == grouped_macs // 4
    assert model(x).shape == (2, 8, 8, 8)


@pytest.mark.parametrize("build", [_plain, Net])
def test_removing_silenced_units_keeps_the_outputs(build) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build().eval()
    randomise_norms(model)
    assert_silenced_removal_exact(model, torch.randn(2, 3, 8, 8))


def test_a_residual_network_prunes_and_runs_at_another_batch() -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    before = count_macs(model, x).dense
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert model.blocks[0].conv2[0].groups == 6
    assert count_macs(model, x).dense < 0.35 * before
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 5)


def test_a_channel_multiplier_loses_whole_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    assert not can_shrink_per_group(model[2])
    graph = build_dependency_graph(model, x)
    assert _roles(graph, "2") == {"grouped_in", "grouped_out"}
    assert_silenced_removal_exact(model, x)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    conv = model[2]
    assert conv.groups < 8 and (conv.in_channels, conv.out_channels) == (
        conv.groups,
        2 * conv.groups,
    )
    assert model(x).shape == (2, 4, 8, 8)


def test_a_grouped_conv_reading_whole_groups_removes_whole_groups_too() -> None:
    """The first conv's output goes in blocks of its groups: the second cannot also take the
    k-th channel of each of its groups, so it removes whole groups as well; nothing is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.Conv2d(16, 2, 1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    assert _roles(graph, "3") == {"grouped_in", "grouped_out"}
    assert {reason for _, reason in graph.blocked} == {"model input", "model output"}
    assert_silenced_removal_exact(model, x)


def test_weight_scores_count_each_groups_filters_and_inputs() -> None:
    """A unit's L1 score adds the producer's filters of every group and the grouped conv's
    weight column it deletes in every filter."""
    torch.manual_seed(0)
    model, x = _plain().eval(), torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    feeding = next(g for g in graph.groups if "0" in g.producers())
    (score,) = group_scores(model, [feeding], create_criterion("l1"))
    w0, w3 = model[0].weight.detach().abs(), model[3].weight.detach().abs()
    expected = [float(w0[[k, k + 4, k + 8, k + 12]].sum() + w3[:, k].sum()) for k in range(4)]
    torch.testing.assert_close(score, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_an_activation_criterion_reads_each_groups_inputs() -> None:
    torch.manual_seed(0)
    model, x = _plain().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model[0].weight[[2, 6, 10, 14]] = 0.0  # unit 2 of the grouped conv's inputs is silent
        model[0].bias[[2, 6, 10, 14]] = 0.0
    graph = build_dependency_graph(model, x)
    feeding = next(g for g in graph.groups if "0" in g.producers())
    (score,) = group_scores(model, [feeding], create_criterion("activation"), calibration=[x])
    assert int(score.argmin()) == 2 and float(score[2]) == 0.0


def test_a_pruned_regnet_saves_and_reloads_exactly(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = create_model("torchvision.regnet_x_400mf", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x[:1])
    conv = model.trunk_output.block1[0].f.b[0]
    assert conv.groups == 2 and conv.in_channels == 16  # 2 groups of 16 -> 2 groups of 8
    path = save_model(model, tmp_path / "regnet.safetensors")
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["edits"]["groups"]["trunk_output.block1.block1-0.f.b.0"] == 2
    loaded = load_model(path).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_bad_groups_edit_is_refused(tmp_path) -> None:  # noqa: ANN001
    model = create_model("torchvision.regnet_x_400mf", num_classes=5).eval()
    path = save_model(model, tmp_path / "regnet.safetensors")
    manifest_file = path.with_suffix(".json")
    for edit, message in (
        ({"fc": 2}, "no grouped conv"),
        ({"trunk_output.block1.block1-0.f.b.0": 99}, "must be an integer from 1 to 2"),
        ({"trunk_output.block1.block1-0.f.b.0": 1}, "keeps its width but its saved group count"),
    ):
        manifest = json.loads(manifest_file.read_text())
        manifest["edits"]["groups"] = edit
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=message):
            load_model(path)


def test_a_file_from_before_per_group_shrinking_reloads_with_whole_groups() -> None:
    """Without a recorded group count a grouped conv that shrank lost whole groups."""
    fresh = _plain()
    state = {k: v.clone() for k, v in _plain().state_dict().items()}
    keep_in = [i for i in range(16) if i not in (0, 1, 2, 3)]  # group 0 of 4 inputs ...
    keep_out = list(range(8, 32))  # ... and its 8 filters
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        state[name] = state[name][keep_in]
    for name in ("3.weight", "3.bias", "4.weight", "4.bias", "4.running_mean", "4.running_var"):
        state[name] = state[name][keep_out]
    state["6.weight"] = state["6.weight"][:, keep_out]
    resize_to_state_(fresh, state)
    fresh.load_state_dict(state)
    assert (fresh[3].in_channels, fresh[3].out_channels, fresh[3].groups) == (12, 24, 3)
    assert fresh.eval()(torch.randn(1, 3, 4, 4)).shape == (1, 8, 4, 4)


def test_grouped_convs_nested_in_each_others_groups_resolve_to_no_stride() -> None:
    table = SpaceTable()
    space = table.new(16)
    inner = table.interleave(space, 2)
    table.interleave(inner, 2)
    assert {repeats for *_, repeats, _ in table.resolve(space)} == {0}


def test_grouped_convs_of_different_group_counts_on_one_space_block_it() -> None:
    table = SpaceTable()
    space = table.new(16)
    table.interleave(space, 2)
    table.interleave(space, 4)
    assert space in table.blocked


def test_a_weight_standardised_grouped_conv_pools_the_channels_it_reads() -> None:
    """timm's StdConv2d standardises each filter over its inputs: shrinking every group
    changes those statistics, so the channels it reads are removed, but not exactly."""
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), layers.StdConv2d(16, 32, 3, padding=1, groups=4), nn.Conv2d(32, 4, 1)
    ).eval()
    graph = build_dependency_graph(model, torch.randn(1, 3, 8, 8))
    kinds = {g.producers()[0]: g.kind for g in graph.groups}
    assert kinds == {"0": "hidden", "1": "channel"}


def test_a_saved_group_count_that_does_not_divide_the_widths_is_refused(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = create_model("torchvision.regnet_x_400mf", num_classes=5).eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=torch.randn(1, 3, 32, 32))
    path = save_model(model, tmp_path / "regnet.safetensors")
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    name, count = next((n, c) for n, c in manifest["edits"]["groups"].items() if c >= 4)
    width = model.get_submodule(name).out_channels
    bad = next(k for k in range(2, count) if width % k)
    manifest["edits"]["groups"][name] = bad
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"which {bad} groups do not divide"):
        load_model(path)


def test_a_groupnorm_after_a_per_group_conv_shrinks_each_of_its_groups(tmp_path) -> None:  # noqa: ANN001
    """Each GroupNorm group spans whole conv groups, so it loses as many channels as the
    others; its statistics move (kind ``hidden``), and its group count stays."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.GroupNorm(2, 16),
        nn.ReLU(), nn.Conv2d(16, 4, 1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    assert {reason for _, reason in graph.blocked} == {"model input", "model output"}
    kinds = {g.producers()[0]: g.kind for g in graph.groups}
    assert kinds == {"0": "channel", "1": "hidden"}
    prune_(model, StructuredConfig(ratio=0.5, kinds=("channel", "hidden")), example_inputs=x)
    assert (model[1].groups, model[2].num_groups) == (4, 2)
    assert model[2].num_channels == model[1].out_channels < 16
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.GroupNorm(2, 16),
        nn.ReLU(), nn.Conv2d(16, 4, 1),
    ).eval()  # fmt: skip
    resize_to_state_(fresh, state, {"1": 4, "2": 2})
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_file_without_group_counts_shrunk_per_group_reloads() -> None:
    """A grouped conv whose weight holds fewer inputs per group shrank every group alike."""
    torch.manual_seed(0)
    model, x = _plain().eval(), torch.randn(1, 3, 8, 8)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    fresh = _plain().eval()
    resize_to_state_(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert fresh[3].groups == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_round_to_counts_the_channels_a_unit_spans() -> None:
    """A per-group unit is one channel in each of 4 groups: ``round_to=8`` keeps an even number
    of units. A head of 4 channels likewise: 2 heads make 8 channels."""
    torch.manual_seed(0)
    model, x = _plain().eval(), torch.randn(1, 3, 8, 8)
    prune_(model, StructuredConfig(ratio=0.6, round_to=8), example_inputs=x)
    assert (model[3].in_channels, model[3].out_channels) == (8, 8)  # 2 of 4 and 2 of 8 units
    timm = pytest.importorskip("timm")
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=8,
        num_classes=5,
    ).eval()  # fmt: skip
    result = prune_(
        vit,
        StructuredConfig(ratio=0.4, round_to=8, kinds=("head",)),
        example_inputs=torch.randn(1, 3, 32, 32),
    )
    assert result.widths == ((8, 4),)  # 4 heads of 4: 16 channels; units of 8 would keep 8
