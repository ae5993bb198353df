"""Importance criteria: exact against hand or brute-force computations, per weight and per group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur import ConfigError, StructuredConfig, UnstructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.importance import (
    collect_statistics,
    create_criterion,
    group_scores,
    list_criteria,
    normalize,
    register_criterion,
    weight_scores,
)
from secateur.pruning import prunable_weights, unstructured_masks


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    ).eval()


def calibration(n_batches: int = 3, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 4, (batch,), generator=g))
        for _ in range(n_batches)
    ]


BUILTIN = [
    "activation",
    "apoz",
    "l1",
    "l2",
    "magnitude",
    "obd",
    "obd_hutchinson",
    "random",
    "taylor",
    "wanda",
]


def test_every_builtin_is_registered() -> None:
    assert set(BUILTIN) <= set(list_criteria())


@pytest.mark.parametrize("name", BUILTIN)
def test_every_criterion_prunes_weights_to_the_exact_sparsity(name: str) -> None:
    model = tiny_cnn()
    masks = prune_(
        model, UnstructuredConfig(sparsity=0.6, criterion=name), calibration=calibration()
    )
    total = sum(m.numel() for m in masks.masks.values())
    assert masks.sparsity() == pytest.approx(round(0.6 * total) / total)
    for key, mask in masks.masks.items():
        assert torch.all(model.get_parameter(key)[~mask] == 0)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_every_criterion_prunes_groups_and_the_model_still_runs(name: str, scope: str) -> None:
    model = tiny_cnn()
    x = torch.randn(2, 1, 8, 8)
    result = prune_(
        model,
        StructuredConfig(ratio=0.5, criterion=name, scope=scope),
        example_inputs=x,
        calibration=calibration(),
    )
    assert result.removed_units == pytest.approx(0.5 * (6 + 8 + 12), abs=1)
    assert model(x).shape == (2, 4)


def test_data_criteria_without_calibration_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="calibration"):
        prune_(tiny_cnn(), UnstructuredConfig(sparsity=0.5, criterion="wanda"))
    with pytest.raises(ConfigError, match="loss"):
        prune_(
            tiny_cnn(),
            UnstructuredConfig(sparsity=0.5, criterion="taylor"),
            calibration=[torch.randn(2, 1, 8, 8)],
        )


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def test_taylor_is_the_sum_over_batches_of_abs_weight_times_gradient() -> None:
    model, data = tiny_cnn(), calibration()
    expected = torch.zeros_like(model[6].weight)
    for x, y in data:
        model.zero_grad()
        _loss(model, x, y).backward()
        expected += (model[6].weight * model[6].weight.grad).abs()
    model.zero_grad(set_to_none=True)
    scores = weight_scores(
        model, create_criterion("taylor"), {"6.weight": model[6]}, calibration=data
    )
    torch.testing.assert_close(scores["6.weight"], expected.detach())
    assert model[6].weight.grad is None  # gradients left as they were


def test_fisher_is_the_mean_of_per_sample_squared_gradients() -> None:
    model, data = tiny_cnn(), calibration(2, 5)
    expected, n = torch.zeros_like(model[8].weight), 0
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            _loss(model, x[i : i + 1], y[i : i + 1]).backward()
            expected += model[8].weight.grad.pow(2)
            n += 1
    stats = collect_statistics(model, data, ["fisher"], params=["8.weight"], fisher_chunk=3)
    torch.testing.assert_close(stats.fisher["8.weight"], expected.detach() / n)


def test_obd_with_hutchinson_matches_the_brute_force_hessian_diagonal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    w = model[2].weight

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(model[0](x))
        return nn.functional.cross_entropy(hidden @ flat.view_as(w).t() + model[2].bias, y)

    exact = torch.autograd.functional.hessian(loss_of, w.detach().flatten()).diagonal()
    saliency_exact = 0.5 * exact.view_as(w) * w.detach().pow(2)
    stats = collect_statistics(
        model, [(x, y)] * 50, ["hutchinson"], params=["2.weight"], hutchinson_probes=40
    )
    torch.testing.assert_close(stats.hutchinson["2.weight"], exact.view_as(w), rtol=0.1, atol=2e-3)
    ctx_scores = weight_scores(
        model, create_criterion("obd", hessian="hutchinson"), {"2.weight": model[2]}, stats=stats
    )
    torch.testing.assert_close(ctx_scores["2.weight"], saliency_exact, rtol=0.1, atol=1e-3)


def test_obd_with_fisher_is_half_fisher_times_weight_squared() -> None:
    model, data = tiny_cnn(), calibration(1, 6)
    stats = collect_statistics(model, data, ["fisher"], params=["8.weight"])
    scores = weight_scores(model, create_criterion("obd"), {"8.weight": model[8]}, stats=stats)
    expected = 0.5 * stats.fisher["8.weight"] * model[8].weight.detach().pow(2)
    torch.testing.assert_close(scores["8.weight"], expected)


def test_wanda_multiplies_weights_by_input_feature_norms() -> None:
    model, data = tiny_cnn(), calibration()
    captured: list[torch.Tensor] = []
    handle = model[6].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    conv_in: list[torch.Tensor] = []
    handle2 = model[3].register_forward_pre_hook(lambda m, a: conv_in.append(a[0]))
    layers = {"6.weight": model[6], "3.weight": model[3]}
    scores = weight_scores(model, create_criterion("wanda"), layers, calibration=data)
    handle.remove()
    handle2.remove()
    norms = torch.cat(captured).pow(2).sum(0).sqrt()
    torch.testing.assert_close(scores["6.weight"], model[6].weight.detach().abs() * norms[None, :])
    channel = torch.cat(conv_in).pow(2).sum(dim=(0, 2, 3)).sqrt()
    torch.testing.assert_close(
        scores["3.weight"], model[3].weight.detach().abs() * channel[None, :, None, None]
    )


def test_apoz_and_activation_remove_a_dead_channel_first() -> None:
    model = tiny_cnn()
    with torch.no_grad():  # channel 2 of the first conv block is always 0 after its ReLU
        model[1].bias[2] = -100.0
        model[0].weight[2] *= 10  # and has the largest weights, so magnitude would keep it
    graph = build_dependency_graph(model, torch.randn(2, 1, 8, 8))
    group = next(g for g in graph.groups if "0" in g.producers())
    for name in ("apoz", "activation"):
        (scores,) = group_scores(model, [group], create_criterion(name), calibration=calibration())
        assert int(scores.argmin()) == 2
    (l2,) = group_scores(model, [group], create_criterion("l2"))
    assert int(l2.argmax()) == 2


def test_user_callable_criterion_scores_weights_and_groups() -> None:
    @register_criterion("test-keep-first-inputs")
    def keep_first() -> object:
        return lambda module, weight: (
            -torch.arange(weight.numel(), dtype=torch.float).view_as(weight)
        )

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    result = prune_(
        model,
        StructuredConfig(ratio=0.5, criterion="test-keep-first-inputs"),
        example_inputs=torch.randn(1, 4),
    )
    assert result.widths == ((6, 3),) and model[0].out_features == 3


def test_global_scope_prunes_the_weaker_layer_more() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    with torch.no_grad():
        model[2].weight[:8] *= 0.01  # half of the second layer's neurons are nearly silent
    config = StructuredConfig(ratio=0.25, scope="global", normalize="none")
    result = prune_(model, config, example_inputs=torch.randn(1, 8))
    assert dict(zip(["first", "second"], result.widths, strict=True))["second"] == (16, 8)
    assert result.removed_units == 8


def test_global_scope_respects_max_ratio() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    with torch.no_grad():
        model[2].weight *= 1e-4
    config = StructuredConfig(ratio=0.5, scope="global", normalize="none", max_ratio=0.75)
    result = prune_(model, config, example_inputs=torch.randn(1, 8))
    assert result.widths[1] == (16, 4)  # capped at 75% of its units


def test_per_layer_ratios_override_the_default() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    result = prune_(
        model, StructuredConfig(ratio=0.5, per_layer={"2": 0.25}), example_inputs=torch.randn(1, 8)
    )
    assert result.widths == ((16, 8), (16, 12))
    masks = unstructured_masks(model, UnstructuredConfig(sparsity=0.5, per_layer={"4": 0.0}))
    assert bool(masks["4.weight"].all())
    assert (~masks["0.weight"]).sum() + (~masks["2.weight"]).sum() == round(0.5 * (64 + 96))


def test_nm_masks_keep_the_best_n_of_every_m_inputs() -> None:
    model = tiny_cnn()
    masks = unstructured_masks(model, UnstructuredConfig(nm="2:4", exclude=("0", "3")))
    assert UnstructuredConfig(nm="2:4").sparsity == 0.5
    for key, keep in masks.items():
        rows = keep.reshape(keep.shape[0], -1, 4)
        assert torch.all(rows.sum(-1) == 2), key
        w = model.get_parameter(key).detach().abs().reshape(keep.shape[0], -1, 4)
        kept_min = torch.where(rows, w, torch.inf).amin(-1)
        dropped_max = torch.where(rows, -torch.inf, w).amax(-1)
        assert torch.all(kept_min >= dropped_max)
    with pytest.raises(ConfigError, match="multiple of 4"):
        unstructured_masks(model, UnstructuredConfig(nm="2:4"))  # conv 0 has 9 inputs per row
    with pytest.raises(ConfigError, match="N:M"):
        UnstructuredConfig(nm="4")


@pytest.mark.parametrize("criterion", ["magnitude", "l2", "taylor", "obd", "wanda", "random"])
@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_patterns_hold_for_every_criterion(criterion: str, pattern: str, n: int, m: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    calib = [(torch.randn(8, 16), torch.randint(0, 8, (8,))) for _ in range(2)]
    masks = unstructured_masks(
        model, UnstructuredConfig(nm=pattern, criterion=criterion), calibration=calib
    )
    assert set(masks) == {"0.weight", "2.weight"}
    for key, keep in masks.items():
        assert torch.all(keep.reshape(keep.shape[0], -1, m).sum(-1) == n), key


def test_monotone_masks_keep_earlier_pruning() -> None:
    model = tiny_cnn()
    first = unstructured_masks(model, UnstructuredConfig(sparsity=0.3, criterion="random"))
    second = unstructured_masks(model, UnstructuredConfig(sparsity=0.6), pruned=first)
    for key in first:
        assert not torch.any(second[key] & ~first[key])


def test_normalize_puts_layers_on_one_scale() -> None:
    s = torch.tensor([1.0, 3.0])
    assert normalize(s, "mean").tolist() == [0.5, 1.5]
    assert normalize(s, "max").tolist() == pytest.approx([1 / 3, 1.0])
    assert normalize(s, "none") is s
    with pytest.raises(ConfigError, match="normalize"):
        normalize(s, "zscore")


def test_layer_scores_are_independent_of_unrelated_layers() -> None:
    model = tiny_cnn()
    layers = prunable_weights(model)
    a = weight_scores(model, create_criterion("wanda"), layers, calibration=calibration())
    b = weight_scores(
        model, create_criterion("wanda"), {"6.weight": model[6]}, calibration=calibration()
    )
    torch.testing.assert_close(a["6.weight"], b["6.weight"])
