"""The training loop, evaluation, fine-tuning under masks, and device choice."""

from __future__ import annotations

import pytest
import torch

from secateur import UnstructuredConfig, create_model, measure, prune_
from secateur.data import load_fashion_mnist
from secateur.errors import ConfigError
from secateur.recovery import finetune
from secateur.training import TrainConfig, evaluate, fit, resolve_device


@pytest.fixture
def digits(digits_idx_dir):
    return load_fashion_mnist(digits_idx_dir)


def test_fit_learns_digits(digits) -> None:
    model = create_model("lenet_300_100")
    chance = evaluate(model, digits.test)
    history = fit(model, digits, TrainConfig(epochs=3, batch_size=64, lr=0.05), progress=False)
    assert [r.epoch for r in history] == [1, 2, 3]
    assert history[-1].train_loss < history[0].train_loss
    assert evaluate(model, digits.test) > max(0.85, chance + 0.5)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_fit_is_deterministic_for_a_seed(digits, schedule: str) -> None:
    config = TrainConfig(epochs=1, batch_size=128, seed=3, schedule=schedule)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("lenet5")
        fit(model, digits, config, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_batchnorm_models_train_with_a_ragged_last_batch(digits) -> None:
    # 1375 training images with batch 1374 would leave a batch of 1, which BatchNorm rejects
    model = create_model("vgg11_bn", width_mult=0.125)
    fit(model, digits, TrainConfig(epochs=1, batch_size=len(digits.train) - 1), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_finetune_keeps_pruned_weights_zero_and_recovers(digits) -> None:
    model = create_model("lenet_300_100")
    fit(model, digits, TrainConfig(epochs=3, batch_size=64), progress=False)
    masks = prune_(model, UnstructuredConfig(sparsity=0.95))
    zeros = int(sum((model.get_parameter(n) == 0).sum() for n in masks.masks))
    pruned_acc = evaluate(model, digits.test)
    finetune(model, digits, TrainConfig(epochs=2, batch_size=64, lr=0.02), masks, progress=False)
    assert int(sum((model.get_parameter(n) == 0).sum() for n in masks.masks)) == zeros
    assert evaluate(model, digits.test) >= pruned_acc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", -1),
        ("batch_size", 0),
        ("lr", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("schedule", "step"),
        ("label_smoothing", 1.0),
        ("seed", -1),
    ],
)
def test_train_config_names_the_bad_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_train_config_round_trip() -> None:
    config = TrainConfig(epochs=2, schedule="onecycle")
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_prune_measure_on_cuda(digits) -> None:
    device = resolve_device("cuda")
    model = create_model("lenet5").to(device)
    fit(model, digits, TrainConfig(epochs=1), progress=False)
    masks = prune_(model, UnstructuredConfig(sparsity=0.8))
    finetune(model, digits, TrainConfig(epochs=1), masks, progress=False)
    metrics = measure(
        model, digits.example_input.to(device), eval_split=digits.test, latency_runs=20
    )
    assert metrics.latency is not None and metrics.latency.device.startswith("cuda")
    assert metrics.nonzero_params < metrics.params
