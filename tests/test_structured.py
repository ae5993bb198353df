"""Structural pruning: the dependency graph, exact surgery and coverage of real architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateur import StructuredConfig, create_model, list_models, prune_
from secateur.errors import ConfigError
from secateur.graph import build_dependency_graph
from secateur.measure import count_macs
from secateur.pruning._structured import units_to_keep
from secateur.pruning._surgery import remove_units_
from structured_helpers import random_units, randomise_norms, silence_

torchvision = pytest.importorskip("torchvision")

TV_MODELS = [
    "resnet18",
    "mobilenet_v2",
    "densenet121",
    "squeezenet1_0",
    "efficientnet_b0",
    "vgg11_bn",
]


def zoo_cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    cases = []
    for name in list_models():
        kwargs = {"width_mult": 0.25} if name.startswith("vgg") else {}
        cases.append((name, create_model(name, **kwargs), torch.randn(2, 1, 28, 28)))
    return cases


def tv_case(name: str) -> tuple[str, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return name, getattr(torchvision.models, name)(num_classes=10), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize(
    "case", zoo_cases() + [tv_case(n) for n in TV_MODELS[:3]], ids=lambda c: c[0]
)
def test_ratio_zero_leaves_outputs_identical(case) -> None:
    _, model, x = case
    model.eval()
    before = model(x)
    result = prune_(model, StructuredConfig(ratio=0.0), example_inputs=x)
    assert result.removed_units == 0
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("case", zoo_cases() + [tv_case(n) for n in TV_MODELS], ids=lambda c: c[0])
def test_removing_silenced_units_keeps_outputs(case) -> None:
    _, model, x = case
    model.eval()
    randomise_norms(model)
    graph = build_dependency_graph(model, x)
    assert graph.groups, "a model with hidden layers must have prunable groups"
    gen = torch.Generator().manual_seed(0)
    removals = [(g, random_units(g, gen)) for g in graph.groups if g.size > 1]
    for group, units in removals:
        silence_(model, group, units)
    expected = model(x)
    macs_before = count_macs(model, x).dense
    remove_units_(model, removals)
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)
    assert count_macs(model, x).dense < macs_before


def test_each_group_of_a_resnet_alone() -> None:
    model = create_model("resnet20", in_channels=3, image_size=32).eval()
    randomise_norms(model)
    x = torch.randn(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(2)
    for i, group in enumerate(build_dependency_graph(model, x).groups):
        trial = copy.deepcopy(model)
        graph = build_dependency_graph(trial, x)
        units = random_units(graph.groups[i], gen)
        silence_(trial, graph.groups[i], units)
        expected = trial(x)
        remove_units_(trial, [(graph.groups[i], units)])
        assert torch.allclose(trial(x), expected, atol=1e-5), f"group {i}: {group.module_names()}"


def test_residual_group_couples_every_operand() -> None:
    model = create_model("resnet20")
    graph = build_dependency_graph(model, torch.zeros(1, 1, 28, 28))
    stem = next(g for g in graph.groups if "conv1" in g.module_names())
    names = stem.module_names()
    # stem conv + its BN, every stage-1 block's output BN and first conv (reader)
    assert {
        "conv1",
        "bn1",
        "layer1.0.bn2",
        "layer1.2.bn2",
        "layer1.0.conv1",
        "layer2.0.conv1",
    } <= set(names)
    assert "layer2.0.shortcut.0" in names  # the projection shortcut reads the stage-1 space


def test_flatten_into_linear_expands_over_positions() -> None:
    model = create_model("lenet5")
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=torch.zeros(1, 1, 28, 28))
    assert model.conv2.out_channels == 8
    assert model.fc1.in_features == 8 * 5 * 5
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_concat_offsets_in_densenet() -> None:
    model = torchvision.models.densenet121(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    before = count_macs(model, x).dense
    prune_(model, StructuredConfig(ratio=0.3), example_inputs=x)
    assert model(x).shape == (1, 10)
    assert count_macs(model, x).dense < 0.8 * before
    # the transition BN reads every block output through concat offsets
    assert model.features.transition1.norm.num_features < 256


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.cumsum(h, dim=-1)  # mixes channels: no rule, so never pruned through
        if h.sum() > -1e9:  # data-dependent control flow traces as it runs
            h = self.b(h).relu()
        return self.c(h)


def test_unknown_op_blocks_its_channels_and_says_so() -> None:
    model = UnknownOp()
    x = torch.randn(2, 8)
    graph = build_dependency_graph(model, x)
    assert [g.module_names() for g in graph.groups] == [["b", "c"]]
    assert any("cumsum" in reason for _, reason in graph.blocked)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert (model.a.out_features, model.b.out_features) == (16, 8)
    assert model(x).shape == (2, 4)


def test_pruned_model_trains() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize(
    ("size", "ratio", "round_to", "kept"),
    [
        (64, 0.5, 1, 32),
        (64, 0.3, 8, 40),
        (64, 0.99, 8, 8),
        (6, 0.5, 8, 3),
        (10, 0.0, 4, 10),
        (3, 0.9, 1, 1),
    ],
)
def test_channel_rounding(size: int, ratio: float, round_to: int, kept: int) -> None:
    assert units_to_keep(size, ratio, round_to) == kept


def test_round_to_keeps_widths_multiples() -> None:
    model = create_model("vgg11_bn")
    x = torch.zeros(1, 1, 28, 28)
    prune_(model, StructuredConfig(ratio=0.3, round_to=8), example_inputs=x)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and widths[0] == 40


def test_structured_config_validation() -> None:
    with pytest.raises(ConfigError, match="ratio"):
        StructuredConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        StructuredConfig(ratio=0.5, round_to=0)
    with pytest.raises(ConfigError, match="example_inputs"):
        prune_(create_model("lenet5"), StructuredConfig(ratio=0.5))
    assert StructuredConfig.from_dict(
        StructuredConfig(ratio=0.2, ignore=("fc*",)).to_dict()
    ).ignore == ("fc*",)


def test_ignore_leaves_groups_whole() -> None:
    model = create_model("lenet_300_100")
    prune_(
        model,
        StructuredConfig(ratio=0.5, ignore=("fc3",)),
        example_inputs=torch.zeros(1, 1, 28, 28),
    )
    assert model.fc2.out_features == 100  # fc3 reads this group, so it stays whole
    assert model.fc1.out_features == 150


def test_resnet50_pruned_is_smaller_faster_and_reloads(tmp_path) -> None:
    from secateur import load_model, save_model
    from secateur.measure import count_params, measure_latencies

    model = create_model("torchvision.resnet50", num_classes=10).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert count_params(model)[0] < 0.35 * count_params(dense)[0]
    assert count_macs(model, x).dense < 0.35 * count_macs(dense, x).dense
    fast, slow = measure_latencies([model, dense], x, runs=20, warmup=3)
    assert fast.median_ms < slow.median_ms
    path = save_model(model, tmp_path / "r50.safetensors")
    assert path.stat().st_size < 0.4 * sum(p.numel() * 4 for p in dense.parameters())
    restored = load_model(path).model
    assert restored.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels
    assert torch.equal(restored(x), model(x))


def test_torchvision_names_build_without_downloads() -> None:
    model = create_model("torchvision.mobilenet_v2", num_classes=7)
    assert model.secateur_spec == {"name": "torchvision.mobilenet_v2", "kwargs": {"num_classes": 7}}
    with pytest.raises(ConfigError, match="never downloaded"):
        create_model("torchvision.resnet18", weights="DEFAULT")
    with pytest.raises(ConfigError, match="unknown torchvision classifier"):
        create_model("torchvision.nosuchnet")


class Transposed(nn.Module):
    """Token-major MLP: transposes/permutes keep the feature axis traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F, T)
        h = self.a(x.transpose(1, 2)).relu()  # (B, T, 12)
        h = h.permute(0, 2, 1).transpose(dim0=1, dim1=2)  # back to (B, T, 12)
        h = torch.movedim(h, 0, 1).movedim(1, 0)  # no rule: blocks the 12-wide space
        return self.b(h).mean(dim=1)


def test_transposes_are_followed_and_movedim_blocks() -> None:
    model = Transposed()
    graph = build_dependency_graph(model, torch.randn(2, 6, 5))
    assert graph.groups == ()
    assert any("movedim" in reason for _, reason in graph.blocked)
    model.forward = lambda x: model.b(
        model.a(x.transpose(1, 2)).relu().permute(0, 2, 1).transpose(1, 2)
    ).mean(dim=1)
    (group,) = build_dependency_graph(model, torch.randn(2, 6, 5)).groups
    assert group.module_names() == ["a", "b"]


class ScaledNormAndStack(nn.Module):
    """A norm that scales by ``1 + weight`` and casts with ``type_as`` (Gemma), and channels
    paired through ``torch.stack`` (an interleaved rotary embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.randn(8) * 0.1)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = (h * (1.0 + self.scale.float())).type_as(x)
        h = torch.stack((-h, h.relu()), dim=-1).sum(-1)  # the new axis comes after the channels
        return self.b(h)


def test_param_arithmetic_type_as_and_stack_are_followed() -> None:
    model = ScaledNormAndStack().eval()
    x = torch.randn(4, 6)
    (group,) = build_dependency_graph(model, x).groups
    assert group.size == 8
    assert {(m.module_name, m.tensor) for m in group.members if m.role == "param"} == {
        ("", "scale")
    }
    units = torch.tensor([1, 4, 6])
    silence_(model, group, units)
    reference = model(x)
    remove_units_(model, [(group, units)])
    assert model.scale.shape == (5,)
    torch.testing.assert_close(model(x), reference)
