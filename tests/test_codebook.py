"""k-means weight sharing and centroid fine-tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secateur import ConfigError, UnstructuredConfig, create_model, prune_
from secateur.data import load_fashion_mnist
from secateur.quantization import CodebookConfig, cluster_weights_, kmeans_1d
from secateur.training import TrainConfig, evaluate, fit


def test_kmeans_is_exact_when_values_are_few() -> None:
    values = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0])
    centroids, codes = kmeans_1d(values, 4)
    assert torch.equal(centroids, torch.tensor([-1.0, 0.5, 2.0]))
    assert torch.equal(centroids[codes], values)


def test_kmeans_assigns_nearest_centroid_and_beats_uniform_levels() -> None:
    torch.manual_seed(0)
    values = torch.randn(5000) ** 3  # heavy-tailed, like trained weights
    centroids, codes = kmeans_1d(values, 16)
    assert centroids.numel() <= 16 and torch.all(centroids[1:] > centroids[:-1])
    nearest = (values[:, None] - centroids[None]).abs().argmin(dim=1)
    assert torch.equal(codes, nearest)
    uniform = torch.linspace(float(values.min()), float(values.max()), 16)
    uniform_err = (values[:, None] - uniform[None]).abs().min(dim=1).values.pow(2).mean()
    assert (values - centroids[codes]).pow(2).mean() < uniform_err


def test_cluster_weights_shares_values_and_keeps_zeros() -> None:
    torch.manual_seed(0)
    net = create_model("lenet_300_100")
    prune_(net, UnstructuredConfig(sparsity=0.8))
    zeros = {n: p == 0 for n, p in net.named_parameters() if p.dim() == 2}
    books = cluster_weights_(net, CodebookConfig(bits=3, per_layer={"fc3": 5}))
    assert books.bits == {"fc1.weight": 3, "fc2.weight": 3, "fc3.weight": 5}
    for name, param in net.named_parameters():
        if name in zeros:
            assert torch.equal(param == 0, zeros[name])
            limit = 1 << books.bits[name]
            assert param[param != 0].unique().numel() <= limit
            assert torch.equal(books.centroids(name).sort().values, param[param != 0].unique())


def test_nothing_to_cluster_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="exclude"):
        cluster_weights_(create_model("lenet_300_100"), CodebookConfig(exclude=("*",)))
    with pytest.raises(ConfigError, match="bits"):
        CodebookConfig(bits=0)


def test_centroid_fine_tuning_keeps_sharing_and_recovers_accuracy(digits_idx_dir: Path) -> None:
    torch.manual_seed(0)
    data = load_fashion_mnist(digits_idx_dir, val_fraction=0.0)
    net = create_model("lenet_300_100")
    fit(net, data, TrainConfig(epochs=3, lr=0.05), progress=False)
    prune_(net, UnstructuredConfig(sparsity=0.9))
    zeros = net.fc1.weight == 0
    books = cluster_weights_(net, CodebookConfig(bits=2))
    before = evaluate(net, data.test)
    start = books.centroids("fc1.weight").clone()
    fit(net, data, TrainConfig(epochs=2, lr=0.01), constraint=books, progress=False)
    after = evaluate(net, data.test)
    assert not torch.equal(books.centroids("fc1.weight"), start)  # centroids did move
    for name in books.names():
        weight = net.get_parameter(name)
        assert weight[weight != 0].unique().numel() <= 4
    assert torch.equal(net.fc1.weight == 0, zeros)
    assert after >= before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_snapping_is_stable_in_every_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(1000, 1000)).to(dtype)
    with torch.no_grad():
        layer[0].weight.uniform_(0.01, 0.03)
    books = cluster_weights_(layer, CodebookConfig(bits=1))
    start = books.centroids("0.weight").clone()
    for _ in range(50):
        books.snap()
    assert torch.equal(books.centroids("0.weight"), start)
    assert float(start.min()) > 0.01
