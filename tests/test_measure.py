"""MAC counts against hand-computed values for every zoo model, plus params, latency and Metrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateur import UnstructuredConfig, create_model, list_models, prune_
from secateur.errors import ConfigError
from secateur.measure import (
    Metrics,
    count_macs,
    count_params,
    layer_sparsity,
    measure,
    measure_latencies,
    measure_latency,
)


def conv(cin: int, cout: int, k: int, hw: int, groups: int = 1) -> int:
    """MACs of a k×k conv producing an hw×hw map: one per weight per output position."""
    return cout * hw * hw * (cin // groups) * k * k


def resnet_macs(n: int, cin: int, size: int) -> int:
    s1, s2, s3 = size, size // 2, size // 4
    stem = conv(cin, 16, 3, s1)
    stage1 = 2 * n * conv(16, 16, 3, s1)
    stage2 = conv(16, 32, 3, s2) + (2 * n - 1) * conv(32, 32, 3, s2) + conv(16, 32, 1, s2)
    stage3 = conv(32, 64, 3, s3) + (2 * n - 1) * conv(64, 64, 3, s3) + conv(32, 64, 1, s3)
    return stem + stage1 + stage2 + stage3 + 64 * 10


def vgg11_macs(cin: int, size: int) -> int:
    s = [size, size // 2, size // 4, size // 8, size // 16]
    return (
        conv(cin, 64, 3, s[0])
        + conv(64, 128, 3, s[1])
        + conv(128, 256, 3, s[2])
        + conv(256, 256, 3, s[2])
        + conv(256, 512, 3, s[3])
        + conv(512, 512, 3, s[3])
        + 2 * conv(512, 512, 3, s[4])
        + 512 * 10
    )


def vgg16_macs(cin: int, size: int) -> int:
    s = [size, size // 2, size // 4, size // 8, size // 16]
    return (
        conv(cin, 64, 3, s[0])
        + conv(64, 64, 3, s[0])
        + conv(64, 128, 3, s[1])
        + conv(128, 128, 3, s[1])
        + conv(128, 256, 3, s[2])
        + 2 * conv(256, 256, 3, s[2])
        + conv(256, 512, 3, s[3])
        + 2 * conv(512, 512, 3, s[3])
        + 3 * conv(512, 512, 3, s[4])
        + 512 * 10
    )


HAND_MACS = {
    # (model, in_channels, image_size): MACs per sample
    ("lenet_300_100", 1, 28): 784 * 300 + 300 * 100 + 100 * 10,
    ("lenet_300_100", 3, 32): 3072 * 300 + 300 * 100 + 100 * 10,
    # conv1 padded to 28×28 out; conv2 10×10 out; then 400-120-84-10
    ("lenet5", 1, 28): conv(1, 6, 5, 28) + conv(6, 16, 5, 10) + 400 * 120 + 120 * 84 + 84 * 10,
    ("lenet5", 3, 32): conv(3, 6, 5, 28) + conv(6, 16, 5, 10) + 400 * 120 + 120 * 84 + 84 * 10,
    ("vgg11_bn", 1, 28): vgg11_macs(1, 28),
    ("vgg11_bn", 3, 32): vgg11_macs(3, 32),
    ("vgg16_bn", 3, 32): vgg16_macs(3, 32),
    ("resnet20", 3, 32): resnet_macs(3, 3, 32),
    ("resnet20", 1, 28): resnet_macs(3, 1, 28),
    ("resnet32", 3, 32): resnet_macs(5, 3, 32),
    ("resnet44", 3, 32): resnet_macs(7, 3, 32),
    ("resnet56", 3, 32): resnet_macs(9, 3, 32),
}


def test_every_zoo_model_has_a_hand_computed_mac_count() -> None:
    assert {name for name, _, _ in HAND_MACS} == set(list_models())


@pytest.mark.parametrize(("name", "cin", "size"), sorted(HAND_MACS))
def test_macs_match_hand_computation(name: str, cin: int, size: int) -> None:
    model = create_model(name, in_channels=cin, image_size=size).eval()
    count = count_macs(model, torch.zeros(2, cin, size, size))
    assert count.dense == HAND_MACS[(name, cin, size)]
    assert count.nonzero <= count.dense


def test_known_reference_values() -> None:
    # well-known figures: LeNet-300-100 ≈ 266.2k MACs, CIFAR ResNet-20 ≈ 41M MACs (option-B adds 0.26M)
    assert HAND_MACS[("lenet_300_100", 1, 28)] == 266_200
    assert HAND_MACS[("lenet5", 1, 28)] == 416_520
    assert 40_000_000 < HAND_MACS[("resnet20", 3, 32)] < 41_500_000


def test_macs_are_per_sample_whatever_the_batch() -> None:
    model = create_model("lenet5").eval()
    assert count_macs(model, torch.zeros(1, 1, 28, 28)) == count_macs(
        model, torch.zeros(7, 1, 28, 28)
    )


def test_grouped_transposed_and_sequence_layers() -> None:
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4),  # 16 * (8/4) * 9 per output position, 6×6
        nn.ConvTranspose2d(16, 4, 2, stride=2, groups=2),  # 16 * (4/2) * 4 per input position, 6×6
    )
    count = count_macs(model, torch.zeros(3, 8, 6, 6))
    assert count.dense == 16 * 2 * 9 * 36 + 16 * 2 * 4 * 36
    # a Linear applied to a sequence counts once per leading row
    assert count_macs(nn.Linear(5, 7), torch.zeros(2, 10, 5)).dense == 10 * 5 * 7


def test_nonzero_macs_and_params_follow_zeros() -> None:
    model = nn.Sequential(nn.Linear(10, 4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :3] = 1.0
        model[0].bias.zero_()
    count = count_macs(model, torch.zeros(1, 10))
    assert (count.dense, count.nonzero) == (40, 3)
    assert count_params(model) == (44, 3)
    (layer,) = layer_sparsity(model)
    assert (layer.name, layer.params, layer.nonzero) == ("0", 40, 3)
    assert layer.sparsity == pytest.approx(37 / 40)


def test_pruning_lowers_nonzero_counts_exactly() -> None:
    model = create_model("lenet_300_100")
    prune_(model, UnstructuredConfig(sparsity=0.75))
    total, nonzero = count_params(model)
    weights = sum(layer.params for layer in layer_sparsity(model))
    biases = total - weights
    # every bias of a freshly initialised Linear is non-zero; the weights lose exactly 75%
    assert nonzero == weights - round(0.75 * weights) + biases


def test_latency_records_its_conditions() -> None:
    model = nn.Linear(16, 4).train()
    lat = measure_latency(model, torch.zeros(3, 16), runs=20, warmup=2)
    assert lat.runs == 20 and lat.warmup == 2 and lat.batch_size == 3
    assert lat.threads == torch.get_num_threads() and lat.device == "cpu"
    assert lat.runtime.startswith("pytorch ")
    assert 0 < lat.median_ms <= lat.p90_ms
    assert model.training  # mode restored
    assert "median of 20 runs" in lat.conditions()


def test_interleaved_latencies_one_per_model() -> None:
    small = nn.Linear(8, 8)
    big = nn.Sequential(nn.Linear(8, 512), *[nn.Linear(512, 512) for _ in range(8)])
    a, b = measure_latencies([small, big], torch.zeros(1, 8), runs=20)
    assert a.runs == b.runs == 20
    assert b.median_ms > a.median_ms  # eight 512² layers take longer than one 8×8 layer


def test_interleaved_rounds_shuffle_places_and_predecessors() -> None:
    calls: list[int] = []

    class Tagged(nn.Module):
        def __init__(self, tag: int) -> None:
            super().__init__()
            self.tag = tag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.tag)
            return x

    models = [Tagged(0), Tagged(1), Tagged(2)]
    measure_latencies(models, torch.zeros(1), runs=20, warmup=10)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 30 and all(sorted(r) == [0, 1, 2] for r in rounds)
    assert {r[0] for r in rounds} == {0, 1, 2}  # nobody keeps the first place
    before = {k: {r[r.index(k) - 1] for r in rounds if r.index(k) > 0} for k in range(3)}
    assert all(len(b) == 2 for b in before.values())  # nor a single predecessor
    first = list(calls)
    calls.clear()
    measure_latencies(models, torch.zeros(1), runs=20, warmup=10)
    assert calls == first  # seeded: the same orders on every call


@pytest.mark.parametrize(("runs", "warmup"), [(19, 0), (20, -1)])
def test_latency_rejects_too_few_runs(runs: int, warmup: int) -> None:
    with pytest.raises(ConfigError):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), runs=runs, warmup=warmup)


def test_measure_and_metrics_json_round_trip(tmp_path, digits_idx_dir) -> None:
    from secateur.data import load_fashion_mnist
    from secateur.export import save_model

    data = load_fashion_mnist(digits_idx_dir)
    model = create_model("lenet_300_100")
    path = save_model(model, tmp_path / "m.safetensors")
    metrics = measure(
        model, data.example_input, eval_split=data.test, saved_file=path, latency_runs=20
    )
    assert metrics.disk_bytes == path.stat().st_size
    assert metrics.accuracy is not None and metrics.accuracy.samples == len(data.test)
    assert 0.0 <= metrics.accuracy.top1 <= 1.0
    assert metrics.params == metrics.nonzero_params == sum(p.numel() for p in model.parameters())
    assert metrics.macs == HAND_MACS[("lenet_300_100", 1, 28)]
    again = Metrics.from_dict(json.loads(json.dumps(metrics.to_dict())))
    assert again == metrics
    skipped = measure(model, data.example_input, latency_runs=None)
    assert skipped.latency is None and skipped.accuracy is None and skipped.disk_bytes is None
