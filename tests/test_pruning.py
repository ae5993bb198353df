"""Unstructured pruning: exact sparsity, magnitude order, masks that hold through optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateur import UnstructuredConfig, create_model, prune_
from secateur.errors import ConfigError
from secateur.importance import create_criterion, list_criteria, register_criterion
from secateur.pruning import MaskSet, Scope, prunable_weights


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def zeros_of(model: nn.Module) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in prunable_weights(model).items()}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999])
def test_global_scope_prunes_exactly_the_requested_count(sparsity: float) -> None:
    model = mlp()
    total = sum(m.weight.numel() for m in prunable_weights(model).values())
    masks = prune_(model, UnstructuredConfig(sparsity=sparsity))
    assert sum(zeros_of(model).values()) == round(sparsity * total)
    assert masks.sparsity() == pytest.approx(round(sparsity * total) / total)


def test_global_scope_removes_the_smallest_magnitudes_first() -> None:
    model = mlp()
    before = {n: m.weight.detach().abs().clone() for n, m in prunable_weights(model).items()}
    masks = prune_(model, UnstructuredConfig(sparsity=0.6))
    pruned = torch.cat([before[n][~m] for n, m in masks.masks.items()])
    kept = torch.cat([before[n][m] for n, m in masks.masks.items()])
    assert pruned.max() <= kept.min()
    # a global threshold gives layers different sparsities
    per_layer = {n: float((~m).float().mean()) for n, m in masks.masks.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05


def test_layer_scope_prunes_every_layer_to_the_ratio() -> None:
    model = mlp()
    prune_(model, UnstructuredConfig(sparsity=0.5, scope="layer"))
    for name, module in prunable_weights(model).items():
        assert zeros_of(model)[name] == round(0.5 * module.weight.numel())


def test_exclude_keeps_matching_layers_dense() -> None:
    model = create_model("lenet5")
    prune_(model, UnstructuredConfig(sparsity=0.8, exclude=("fc3", "conv*")))
    zeros = zeros_of(model)
    assert zeros["fc3.weight"] == zeros["conv1.weight"] == zeros["conv2.weight"] == 0
    assert zeros["fc1.weight"] > 0


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(16, 20)).pow(2).mean()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "adamw"],
)
def test_masks_hold_exactly_through_training(make_optimizer) -> None:
    model = mlp()
    optimizer = make_optimizer(model.parameters())
    _train_steps(model, optimizer, 3)  # optimizer state (momentum, moments) is non-zero now
    masks = prune_(model, UnstructuredConfig(sparsity=0.7))
    expected = zeros_of(model)
    kept_before = {n: model.get_parameter(n)[m].clone() for n, m in masks.masks.items()}
    with masks.hold(optimizer):
        for _ in range(5):
            _train_steps(model, optimizer, 1)
            for name, mask in masks.masks.items():
                assert torch.all(model.get_parameter(name)[~mask] == 0)
    assert zeros_of(model) == expected
    assert all(
        not torch.equal(model.get_parameter(n)[m], kept_before[n]) for n, m in masks.masks.items()
    )
    masks.make_permanent()
    assert masks.masks == {} and zeros_of(model) == expected


def test_outside_hold_the_optimizer_is_untouched() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks = prune_(model, UnstructuredConfig(sparsity=0.7))
    with masks.hold(optimizer):
        pass
    _train_steps(model, optimizer, 2)  # hooks removed: pruned weights may move again
    assert sum(zeros_of(model).values()) < round(0.7 * sum(m.numel() for m in masks.masks.values()))


def test_random_and_custom_criteria() -> None:
    assert {"magnitude", "random"} <= set(list_criteria())
    a, b = mlp(), mlp()
    prune_(a, UnstructuredConfig(sparsity=0.5))
    prune_(b, UnstructuredConfig(sparsity=0.5, criterion="random"))
    assert any(
        not torch.equal(x.weight == 0, y.weight == 0)
        for x, y in zip(prunable_weights(a).values(), prunable_weights(b).values(), strict=True)
    )

    @register_criterion("test-last-column-first")
    def _factory():
        def score(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
            return torch.arange(weight.shape[1], 0, -1).expand_as(weight).float()

        return score

    model = nn.Sequential(nn.Linear(4, 2))
    prune_(model, UnstructuredConfig(sparsity=0.5, criterion="test-last-column-first"))
    assert torch.all(model[0].weight[:, 2:] == 0) and torch.all(model[0].weight[:, :2] != 0)


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, 2, "0.5", True])
def test_sparsity_out_of_range_names_the_field(bad) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        UnstructuredConfig(sparsity=bad)


def test_bad_scope_and_criterion_and_config_type() -> None:
    with pytest.raises(ConfigError, match="scope"):
        UnstructuredConfig(sparsity=0.5, scope="everywhere")
    with pytest.raises(ConfigError, match="unknown criterion 'nope'"):
        UnstructuredConfig(sparsity=0.5, criterion="nope")
    with pytest.raises(ConfigError, match="unknown criterion"):
        create_criterion("nope")
    with pytest.raises(ConfigError, match="prune_ does not know"):
        prune_(mlp(), {"sparsity": 0.5})
    with pytest.raises(ConfigError, match="no Linear, Conv or expert"):
        prune_(nn.Sequential(nn.ReLU()), UnstructuredConfig(sparsity=0.5))


def test_config_round_trips_through_a_dict() -> None:
    config = UnstructuredConfig(sparsity=0.8, scope=Scope.LAYER, exclude=("fc3",))
    data = config.to_dict()
    assert data == {
        "sparsity": 0.8,
        "scope": "layer",
        "criterion": "magnitude",
        "exclude": ["fc3"],
        "normalize": "none",
        "per_layer": {},
        "nm": None,
    }
    assert UnstructuredConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="unknown UnstructuredConfig field"):
        UnstructuredConfig.from_dict({"sparsity": 0.5, "ratio": 0.1})


def test_maskset_rejects_mismatched_shapes() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="shape"):
        MaskSet(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})


@settings(max_examples=40, deadline=None)
@given(
    sparsity=st.floats(0.0, 0.99),
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    scope=st.sampled_from(["global", "layer"]),
)
def test_property_zero_count_is_exact(sparsity: float, widths: list[int], scope: str) -> None:
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)]
    model = nn.Sequential(*layers)
    prune_(model, UnstructuredConfig(sparsity=sparsity, scope=scope))
    counts = [layer.weight.numel() for layer in layers]
    zeros = [int((layer.weight == 0).sum()) for layer in layers]
    if scope == "global":
        assert sum(zeros) == round(sparsity * sum(counts))
    else:
        assert zeros == [round(sparsity * n) for n in counts]
