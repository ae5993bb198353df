"""BatchNorm recalibration after pruning (recovery.recalibrate_batchnorm_)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateur import ConfigError, StructuredConfig, create_model, prune_
from secateur.recovery import batchnorm_layers, recalibrate_batchnorm_


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip


def test_statistics_become_the_average_over_the_batches_and_nothing_else_changes() -> None:
    model = _net().eval()
    model[1].momentum = 0.3
    params = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2
    batches = [x[:8], x[8:16], x[16:]]
    assert recalibrate_batchnorm_(model, batches) == 1
    with torch.no_grad():
        features = model[0](x)  # three equal batches: their average is the overall mean
    per_batch = [features[i : i + 8] for i in (0, 8, 16)]
    mean = torch.stack([f.mean((0, 2, 3)) for f in per_batch]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in per_batch]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].momentum == 0.3 and not model.training and not model[1].training
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_modes_are_restored_and_a_model_without_batchnorm_is_untouched() -> None:
    model = _net().train()
    model[3].eval()  # a mixed state must come back as it was
    recalibrate_batchnorm_(model, [torch.randn(4, 1, 8, 8)])
    assert model.training and model[1].training and not model[3].training
    plain = nn.Sequential(nn.Linear(3, 2))
    assert recalibrate_batchnorm_(plain, [torch.randn(4, 3)]) == 0
    assert batchnorm_layers(plain) == []


def test_bad_batches_are_one_line_errors_and_leave_the_statistics() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    before = model[1].running_mean.clone()
    with pytest.raises(ConfigError, match="more than one sample"):
        recalibrate_batchnorm_(model, [torch.randn(4, 3), torch.randn(1, 3)])
    assert torch.equal(model[1].running_mean, before) and model[1].momentum == 0.1
    with pytest.raises(ConfigError, match="got no batch"):
        recalibrate_batchnorm_(model, [])


def test_recalibration_repairs_a_one_shot_pruned_resnet() -> None:
    """Stale statistics after channel removal: recalibration brings the outputs back towards
    the ones the same pruned network gives with its true batch statistics."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10, image_size=28)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    model.train()
    with torch.no_grad():  # give the BN layers statistics of real activations
        for _ in range(3):
            model(x)
    model.eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x[:2])

    def error() -> float:
        with torch.no_grad():
            truth = copy.deepcopy(model).train()(x)  # batch statistics of the pruned network
            return float((model(x) - truth).norm() / truth.norm())

    stale = error()
    recalibrate_batchnorm_(model, [x[:32], x[32:]])
    assert error() < 0.2 * stale
