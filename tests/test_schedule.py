"""Pruning schedules: the AGP cubic, gradual pruning inside training, iterative prune/recover rounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur.data import load_fashion_mnist
from secateur.errors import ConfigError
from secateur.pruning import DepthConfig, MaskSet, StructuredConfig, UnstructuredConfig, _schedule
from secateur.pruning._schedule import (
    GradualPruner,
    PruneSchedule,
    ScheduleConfig,
    Spacing,
    agp_sparsity,
    iterative_targets,
    prune_iteratively_,
)
from secateur.pruning._unstructured import prunable_weights
from secateur.training import TrainConfig, evaluate, fit


def mlp(seed: int = 0, hidden: tuple[int, int] = (30, 10)) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], 3),
    )


def total_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in prunable_weights(model).values())


def zero_weights(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in prunable_weights(model).values())


def pruned_sets(masks: MaskSet) -> dict[str, torch.Tensor]:
    return {name: (~m).clone() for name, m in masks.masks.items()}


# --- AGP --------------------------------------------------------------------------------------


def test_agp_hits_initial_middle_and_final() -> None:
    kw = {"initial": 0.1, "final": 0.9, "start": 100, "end": 300}
    assert agp_sparsity(100, **kw) == pytest.approx(0.1)
    assert agp_sparsity(200, **kw) == pytest.approx(0.9 - 0.8 * 0.5**3)
    assert agp_sparsity(150, **kw) == pytest.approx(0.9 - 0.8 * 0.75**3)
    assert agp_sparsity(300, **kw) == pytest.approx(0.9)


def test_agp_clamps_outside_the_window_and_rises_fast_then_slow() -> None:
    kw = {"initial": 0.0, "final": 0.8, "start": 10, "end": 110}
    assert agp_sparsity(0, **kw) == 0.0
    assert agp_sparsity(9, **kw) == 0.0
    assert agp_sparsity(111, **kw) == 0.8
    assert agp_sparsity(10_000, **kw) == 0.8
    values = [agp_sparsity(t, **kw) for t in range(10, 111)]
    gains = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert all(g >= 0 for g in gains)
    assert gains[0] > gains[50] > gains[-1]  # cubic: most pruning early


def test_agp_with_start_equal_to_end_is_a_single_jump() -> None:
    kw = {"initial": 0.2, "final": 0.6, "start": 5, "end": 5}
    assert agp_sparsity(4, **kw) == 0.2
    assert agp_sparsity(5, **kw) == 0.6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial": -0.1}, "initial"),
        ({"final": 1.5}, "final"),
        ({"start": -1}, "start"),
        ({"start": 10, "end": 5}, "end"),
    ],
)
def test_agp_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    args = {"initial": 0.0, "final": 0.5, "start": 0, "end": 10} | kwargs
    with pytest.raises(ConfigError, match=field):
        agp_sparsity(3, **args)


# --- iterative targets ----------------------------------------------------------------------


def test_geometric_targets_remove_the_same_fraction_of_what_remains() -> None:
    targets = iterative_targets(0.875, 3)
    assert targets == pytest.approx([0.5, 0.75, 0.875])
    assert targets[-1] == 0.875
    remaining = [1.0] + [1 - t for t in targets]
    ratios = [b / a for a, b in zip(remaining, remaining[1:], strict=False)]
    assert ratios == pytest.approx([0.5, 0.5, 0.5])


def test_linear_targets_are_evenly_spaced() -> None:
    assert iterative_targets(0.6, 4, spacing="linear") == pytest.approx([0.15, 0.3, 0.45, 0.6])
    assert iterative_targets(0.6, 1, spacing=Spacing.LINEAR) == [0.6]


@pytest.mark.parametrize(
    ("final", "steps", "spacing", "field"),
    [(1.0, 3, "geometric", "final"), (0.5, 0, "linear", "steps"), (0.5, 2, "cubic", "spacing")],
)
def test_iterative_targets_reject_bad_arguments(final, steps, spacing, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        iterative_targets(final, steps, spacing=spacing)


# --- gradual pruning ------------------------------------------------------------------------


def test_gradual_masks_never_regrow_and_pruned_weights_stay_zero() -> None:
    model = mlp()
    config = UnstructuredConfig(sparsity=0.9)
    pruner = GradualPruner(model, config, start_step=2, end_step=12, frequency=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    torch.manual_seed(1)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    snapshots = []
    with pruner.hold(optimizer) as held:
        assert held is pruner and pruner.masks_ is None  # nothing before start_step
        for _ in range(16):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if pruner.masks_ is not None:
                snapshots.append(pruned_sets(pruner.masks_))
                for name, pruned in snapshots[-1].items():
                    param = model.get_parameter(name)
                    assert torch.all(param[pruned] == 0)
                    momentum = optimizer.state[param]["momentum_buffer"]
                    assert torch.all(momentum[pruned] == 0)
    assert [s for s, _ in pruner.history_] == [2, 5, 8, 11, 12]
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        for name in before:
            assert torch.all(after[name][before[name]])  # pruned stays pruned
    n = total_weights(model)
    assert zero_weights(model) == round(0.9 * n)
    assert pruner.masks_.sparsity() == pytest.approx(round(0.9 * n) / n)
    assert pruner.step_ == 16
    # the hooks are gone: a step outside the block moves pruned weights again
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert zero_weights(model) < round(0.9 * n)


def test_gradual_pruner_inside_fit_follows_the_cubic_to_exact_sparsity(digits_idx_dir) -> None:
    data = load_fashion_mnist(digits_idx_dir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    config = UnstructuredConfig(sparsity=0.8)
    pruner = GradualPruner(model, config, start_step=0, end_step=40, frequency=10)
    steps_per_epoch = len(data.train) // 64
    assert steps_per_epoch * 3 > 40
    fit(
        model,
        data,
        TrainConfig(epochs=3, batch_size=64, lr=0.05),
        constraint=pruner,
        progress=False,
    )
    assert [step for step, _ in pruner.history_] == [0, 10, 20, 30, 40]
    for step, sparsity in pruner.history_:
        assert sparsity == pytest.approx(0.8 * (1 - (1 - step / 40) ** 3))
    n = total_weights(model)
    assert zero_weights(model) == round(0.8 * n)
    assert pruner.masks_.sparsity() == pytest.approx(round(0.8 * n) / n)
    for name, keep in pruner.masks_.masks.items():
        assert torch.all(model.get_parameter(name)[~keep] == 0)
    assert pruner.step_ == steps_per_epoch * 3
    assert evaluate(model, data.test) > 0.7  # still learns at 80 % sparsity


def test_gradual_pruner_that_ends_early_applies_the_final_sparsity_and_warns() -> None:
    model = mlp()
    pruner = GradualPruner(model, UnstructuredConfig(sparsity=0.5), end_step=100, frequency=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 20)
    with pytest.warns(UserWarning, match="end_step=100"), pruner.hold(optimizer):
        for _ in range(15):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
    middle = agp_sparsity(10, initial=0.0, final=0.5, start=0, end=100)
    assert pruner.history_ == [(0, 0.0), (10, pytest.approx(middle)), (15, 0.5)]
    assert zero_weights(model) == round(0.5 * total_weights(model))


def test_gradual_pruner_forwards_calibration_and_previous_masks(monkeypatch) -> None:
    calls = []
    real = _schedule.unstructured_masks

    def spy(model, config, **kwargs):
        calls.append((config.sparsity, kwargs))
        return real(model, config, **kwargs)

    monkeypatch.setattr(_schedule, "unstructured_masks", spy)
    model = mlp()
    batches = [(torch.randn(4, 20), torch.tensor([0, 1, 2, 0]))]
    pruner = GradualPruner(
        model, UnstructuredConfig(sparsity=0.5), end_step=2, frequency=1, calibration=batches
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pruner.hold(optimizer):
        for _ in range(2):
            optimizer.zero_grad()
            model(batches[0][0]).sum().backward()
            optimizer.step()
    assert [s for s, _ in calls] == pytest.approx([0.0, 0.4375, 0.5])
    assert all(kw["calibration"] is batches and kw["loss_fn"] is None for _, kw in calls)
    assert calls[0][1]["pruned"] is None
    assert all(isinstance(kw["pruned"], dict) for _, kw in calls[1:])


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(2)
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_gradual_per_layer_fractions_follow_their_own_cubic() -> None:
    model = mlp()
    config = UnstructuredConfig(sparsity=0.5, per_layer={"4": 0.2})
    pruner = GradualPruner(model, config, end_step=4, frequency=2)
    assert pruner.config_at(2).per_layer == {"4": pytest.approx(0.2 * (1 - 0.5**3))}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pruner.hold(optimizer):
        run_steps(model, optimizer, 6)
    last = model.get_parameter("4.weight")
    assert int((last == 0).sum()) == round(0.2 * last.numel())
    rest = [model.get_parameter(n) for n in ("0.weight", "2.weight")]
    assert sum(int((w == 0).sum()) for w in rest) == round(0.5 * sum(w.numel() for w in rest))


def test_gradual_with_a_data_criterion_uses_the_calibration_batches() -> None:
    model = mlp()
    torch.manual_seed(3)
    calibration = [(torch.randn(16, 20), torch.randint(0, 3, (16,)))]
    config = UnstructuredConfig(sparsity=0.6, criterion="taylor")
    pruner = GradualPruner(model, config, end_step=3, frequency=1, calibration=calibration)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pruner.hold(optimizer):
        run_steps(model, optimizer, 5)
    n = total_weights(model)
    assert zero_weights(model) == round(0.6 * n)
    assert model.training  # the criterion's eval-mode pass did not leak out


def test_a_second_hold_runs_the_schedule_again() -> None:
    model = mlp()
    pruner = GradualPruner(model, UnstructuredConfig(sparsity=0.5), end_step=2, frequency=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        with pruner.hold(optimizer):
            run_steps(model, optimizer, 3)
        assert pruner.step_ == 3 and [s for s, _ in pruner.history_] == [0, 1, 2]
        assert zero_weights(model) == round(0.5 * total_weights(model))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"start_step": -1}, "start_step"),
        ({"start_step": 50}, "end_step"),
        ({"frequency": 0}, "frequency"),
        ({"initial_sparsity": 0.9}, "initial_sparsity"),
    ],
)
def test_gradual_pruner_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GradualPruner(mlp(), UnstructuredConfig(sparsity=0.5), **({"end_step": 10} | kwargs))


def test_gradual_pruner_needs_an_unstructured_config() -> None:
    with pytest.raises(ConfigError, match="UnstructuredConfig"):
        GradualPruner(mlp(), StructuredConfig(ratio=0.5), end_step=10)
    with pytest.raises(ConfigError, match="nm="):
        GradualPruner(mlp(), UnstructuredConfig(nm="2:4"), end_step=10)
    with pytest.raises(ConfigError, match="calibration"):
        GradualPruner(mlp(), UnstructuredConfig(criterion="taylor"), end_step=10)


def test_gradual_pruner_init_only_stores_arguments() -> None:
    model = mlp()
    config = UnstructuredConfig(sparsity=0.5)
    pruner = GradualPruner(model, config, end_step=10, frequency=5, initial_sparsity=0.1)
    assert (pruner.model, pruner.config, pruner.end_step) == (model, config, 10)
    assert (pruner.frequency, pruner.initial_sparsity, pruner.start_step) == (5, 0.1, 0)
    assert not hasattr(pruner, "masks_") and not hasattr(pruner, "history_")
    assert zero_weights(model) == 0


# --- iterative pruning ----------------------------------------------------------------------


def test_iterative_unstructured_reaches_the_target_through_monotone_rounds() -> None:
    model = mlp()
    n = total_weights(model)
    seen = []

    def recover(m: nn.Module, masks: MaskSet) -> None:
        seen.append((zero_weights(m), pruned_sets(masks)))
        with torch.no_grad():  # a careless recovery that moves every weight
            for module in prunable_weights(m).values():
                module.weight.add_(0.01)

    rounds = prune_iteratively_(model, UnstructuredConfig(sparsity=0.875), steps=3, recover=recover)
    assert len(seen) == len(rounds) == 3
    targets = iterative_targets(0.875, 3)
    assert [zeros for zeros, _ in seen] == [round(t * n) for t in targets]
    assert [r.sparsity() for r in rounds] == pytest.approx([round(t * n) / n for t in targets])
    for (_, before), (_, after) in zip(seen, seen[1:], strict=False):
        for name in before:
            assert torch.all(after[name][before[name]])
    assert zero_weights(model) == round(0.875 * n)  # masks re-applied after recover


def test_iterative_structured_reaches_the_cumulative_width() -> None:
    model = mlp(hidden=(64, 32))
    example = torch.randn(4, 20)
    widths, calls = [], []

    def recover(m: nn.Module, masks: None) -> None:
        calls.append(masks)
        widths.append((m[0].out_features, m[2].out_features))

    results = prune_iteratively_(
        model, StructuredConfig(ratio=0.5), steps=3, recover=recover, example_inputs=example
    )
    assert calls == [None, None, None] and len(results) == 3
    assert widths == [(51, 25), (40, 20), (32, 16)]
    assert model[0].weight.shape == (32, 20) and model[2].weight.shape == (16, 32)
    assert model(example).shape == (4, 3)
    assert [r.removed_units for r in results] == [13 + 7, 11 + 5, 8 + 4]


def test_iterative_linear_structured_removes_even_shares_of_the_original() -> None:
    model = mlp(hidden=(64, 40))
    prune_iteratively_(
        model,
        StructuredConfig(ratio=0.5),
        steps=2,
        recover=lambda m, masks: None,
        example_inputs=torch.randn(2, 20),
        spacing="linear",
    )
    # round 1 removes 25 % of the original, round 2 a third of what is left: 50 % in all
    assert (model[0].out_features, model[2].out_features) == (32, 20)


def test_iterative_per_layer_fractions_are_split_into_rounds_too() -> None:
    model = mlp(hidden=(64, 32))
    config = StructuredConfig(ratio=0.5, per_layer={"2": 0.25})
    prune_iteratively_(
        model, config, steps=2, recover=lambda m, k: None, example_inputs=torch.randn(2, 20)
    )
    assert (model[0].out_features, model[2].out_features) == (32, 24)
    model = mlp()
    rounds = prune_iteratively_(
        model,
        UnstructuredConfig(sparsity=0.5, per_layer={"4": 0.75}),
        steps=2,
        recover=lambda m, k: None,
    )
    pruned_last = [int((~r.masks["4.weight"]).sum()) for r in rounds]
    assert pruned_last == [round(0.5 * 30), round(0.75 * 30)]  # its own geometric steps


def test_iterative_global_structured_never_lets_a_group_lose_more_than_max_ratio() -> None:
    model = mlp(hidden=(64, 32))
    config = StructuredConfig(ratio=0.6, scope="global", max_ratio=0.7)
    prune_iteratively_(
        model, config, steps=3, recover=lambda m, k: None, example_inputs=torch.randn(2, 20)
    )
    widths = (model[0].out_features, model[2].out_features)
    assert widths[0] >= 0.3 * 64 and widths[1] >= 0.3 * 32
    assert sum(widths) == pytest.approx(0.4 * 96, abs=3)


def test_iterative_forwards_calibration(monkeypatch) -> None:
    calls = []
    real = _schedule.unstructured_masks

    def spy(model, config, **kwargs):
        calls.append(kwargs)
        return real(model, config, **kwargs)

    monkeypatch.setattr(_schedule, "unstructured_masks", spy)
    batches = [torch.randn(4, 20)]
    prune_iteratively_(
        mlp(),
        UnstructuredConfig(sparsity=0.5),
        steps=2,
        recover=lambda m, k: None,
        calibration=batches,
    )
    assert [kw["calibration"] is batches for kw in calls] == [True, True]
    assert calls[0]["pruned"] is None and isinstance(calls[1]["pruned"], dict)


def test_iterative_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="example_inputs"):
        prune_iteratively_(mlp(), StructuredConfig(ratio=0.5), steps=2, recover=lambda m, k: None)
    with pytest.raises(ConfigError, match="recover"):
        prune_iteratively_(mlp(), UnstructuredConfig(sparsity=0.5), steps=2, recover=None)
    with pytest.raises(ConfigError, match="DepthConfig"):
        prune_iteratively_(mlp(), DepthConfig(ratio=0.5), steps=2, recover=lambda m, k: None)
    with pytest.raises(ConfigError, match="nm="):
        prune_iteratively_(mlp(), UnstructuredConfig(nm="2:4"), steps=2, recover=print)
    with pytest.raises(ConfigError, match="calibration"):
        prune_iteratively_(
            mlp(), UnstructuredConfig(criterion="wanda"), steps=2, recover=lambda m, k: None
        )
    with pytest.raises(ConfigError, match="steps"):
        prune_iteratively_(mlp(), UnstructuredConfig(sparsity=0.5), steps=0, recover=print)
    model = mlp()
    with pytest.raises(ConfigError, match="spacing"):
        prune_iteratively_(
            model, UnstructuredConfig(sparsity=0.5), steps=2, recover=print, spacing="log"
        )
    assert zero_weights(model) == 0  # refused before touching the model


# --- config ---------------------------------------------------------------------------------


def test_schedule_config_defaults_and_round_trip() -> None:
    config = ScheduleConfig()
    assert config.kind is PruneSchedule.ONESHOT and config.spacing is Spacing.GEOMETRIC
    assert config.to_dict() == {
        "kind": "oneshot",
        "steps": 3,
        "spacing": "geometric",
        "frequency": 100,
        "start_fraction": 0.0,
        "end_fraction": 0.75,
    }
    gradual = ScheduleConfig(kind="gradual", frequency=5, start_fraction=0.1, end_fraction=0.5)
    assert ScheduleConfig.from_dict(gradual.to_dict()) == gradual
    assert gradual.step_range(200) == (20, 100)
    assert ScheduleConfig(kind="gradual", end_fraction=1e-6).step_range(3) == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "cyclic"}, "kind"),
        ({"steps": 0}, "steps"),
        ({"spacing": "log"}, "spacing"),
        ({"frequency": 0}, "frequency"),
        ({"start_fraction": 1.0}, "start_fraction"),
        ({"end_fraction": 1.5}, "end_fraction"),
        ({"start_fraction": 0.5, "end_fraction": 0.5}, "end_fraction"),
    ],
)
def test_schedule_config_names_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ScheduleConfig(**kwargs)


def test_schedule_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown ScheduleConfig field"):
        ScheduleConfig.from_dict({"kind": "gradual", "epochs": 3})


def test_schedule_is_a_string_enum() -> None:
    assert [s.value for s in PruneSchedule] == ["oneshot", "iterative", "gradual"]
    assert PruneSchedule("iterative") == "iterative"
