"""Least-squares reconstruction of the layers reading removed units (StructuredConfig.reconstruct)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateur import ConfigError, StructuredConfig, prune_
from secateur.pruning import _structured


def _mlp_with_redundant_neurons() -> nn.Sequential:
    """8 neurons, 8 copies of them at half scale (ReLU is positively homogeneous, so each copy
    is exactly half its original) and so the l2 criterion removes the copies first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight[8:] = 0.5 * model[0].weight[:8]
        model[0].bias[8:] = 0.5 * model[0].bias[:8]
    return model


def _error(model: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference).norm() / reference.norm())


def test_redundant_neurons_are_folded_into_the_kept_ones() -> None:
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
    errors = {}
    for reconstruct in (False, True):
        model = _mlp_with_redundant_neurons()
        with torch.no_grad():
            reference = model(x)
        config = StructuredConfig(ratio=0.5, criterion="l2", reconstruct=reconstruct)
        prune_(model, config, example_inputs=x[:2], calibration=[x])
        assert model[0].out_features == 8
        errors[reconstruct] = _error(model, reference, x)
    assert errors[False] > 0.1  # the copies carried a third of the signal
    assert errors[True] < 0.02  # only the dampening stands between the fit and exactness


def test_a_constant_neuron_moves_into_the_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.3  # neuron 0 always outputs 0.3: the lowest l2 score
    x = torch.randn(64, 4)
    with torch.no_grad():
        reference = model(x)
    config = StructuredConfig(ratio=0.25, criterion="l2", reconstruct=True)
    prune_(model, config, example_inputs=x[:2], calibration=[x])
    assert model[0].out_features == 3
    assert _error(model, reference, x) < 1e-3


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _Convs(nn.Module):
    def __init__(self, dims: int, **reader: object) -> None:
        super().__init__()
        self.a = _CONV[dims](3, 8, 3, padding=1)
        self.b = _CONV[dims](8, 4, 3, **reader)
        self.head = nn.Linear(4, 2)
        self.dims = tuple(range(2, 2 + dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))).mean(self.dims))


@pytest.mark.parametrize(
    ("dims", "reader", "shape"),
    [
        (2, {"padding": 1, "stride": 2}, (16, 3, 10, 10)),
        (1, {"padding": "same", "padding_mode": "reflect", "dilation": 2}, (16, 3, 20)),
        (3, {"padding": 1, "padding_mode": "circular"}, (8, 3, 5, 6, 4)),
    ],
    ids=["conv2d", "conv1d-same-reflect", "conv3d-circular"],
)
def test_conv_consumers_are_refitted_through_their_kernel_taps(
    dims: int, reader: dict, shape: tuple[int, ...]
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    errors = {}
    for reconstruct in (False, True):
        torch.manual_seed(0)
        model = _Convs(dims, **reader).eval()
        with torch.no_grad():
            model.a.weight[4:] = 0.5 * model.a.weight[:4]
            model.a.bias[4:] = 0.5 * model.a.bias[:4]
            reference = model.b(torch.relu(model.a(x)))
        config = StructuredConfig(
            ratio=0.0, per_layer={"a": 0.5}, criterion="l2", reconstruct=reconstruct
        )
        prune_(model, config, example_inputs=x[:1], calibration=[x])
        assert model.a.out_channels == 4 and model.b.in_channels == 4
        with torch.no_grad():
            got = model.b(torch.relu(model.a(x)))
        errors[reconstruct] = float((got - reference).norm() / reference.norm())
    assert errors[True] < 0.05 < errors[False]


def test_reconstruction_needs_calibration() -> None:
    model = _mlp_with_redundant_neurons()
    with pytest.raises(ConfigError, match="pass calibration=batches"):
        prune_(
            model, StructuredConfig(ratio=0.5, reconstruct=True), example_inputs=torch.ones(1, 6)
        )
    assert model[0].out_features == 16
    with pytest.raises(ConfigError, match="reconstruct='yes' must be true or false"):
        StructuredConfig(ratio=0.5, reconstruct="yes")  # type: ignore[arg-type]


def test_a_rolled_back_surgery_also_rolls_back_the_refit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp_with_redundant_neurons()
    weights = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(_structured, "_check_forward", lambda *a: "RuntimeError: boom")
    x = torch.randn(32, 6)
    config = StructuredConfig(ratio=0.5, criterion="l2", reconstruct=True)
    result = prune_(model, config, example_inputs=x[:2], calibration=[x])
    assert result.removed_units == 0 and len(result.refused) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_optimizer_state_follows_the_refitted_and_sliced_weights() -> None:
    model = _mlp_with_redundant_neurons()
    x = torch.randn(32, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    opt.step()
    config = StructuredConfig(ratio=0.5, criterion="l2", reconstruct=True)
    prune_(model, config, example_inputs=x[:2], calibration=[x], optimizer=opt)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    assert opt.state[model[2].weight]["exp_avg"].shape == (3, 8)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()  # the pruned model trains on


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    hidden=st.integers(2, 24),
    ratio=st.floats(0.05, 0.9),
    bias=st.booleans(),
    rows=st.integers(1, 64),
)
def test_the_refit_never_fits_the_calibration_inputs_worse_than_plain_removal(
    seed: int, hidden: int, ratio: float, bias: bool, rows: int
) -> None:
    """The damped solve minimises ‖W x − W' x_K‖² + λ‖W' − W_K‖², and plain removal is W' = W_K:
    so on the calibration inputs the refit's error can only be lower (any rows, even fewer than
    the kept columns, any ratio, with or without a bias)."""
    torch.manual_seed(seed)
    x = torch.randn(rows, 5)
    errors = {}
    for reconstruct in (False, True):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 3, bias=bias))
        model.eval()
        with torch.no_grad():
            reference = model(x)
        config = StructuredConfig(ratio=ratio, criterion="l2", reconstruct=reconstruct)
        prune_(model, config, example_inputs=x[:1], calibration=[x])
        with torch.no_grad():
            errors[reconstruct] = float((model(x) - reference).square().sum())
    assert errors[True] <= errors[False] * (1 + 1e-6) + 1e-9


def test_non_finite_calibration_is_a_one_line_error_and_the_model_is_untouched() -> None:
    model = _mlp_with_redundant_neurons()
    weights = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 6)
    x[3, 2] = float("inf")
    config = StructuredConfig(ratio=0.5, criterion="l2", reconstruct=True)
    with pytest.raises(ConfigError, match="hold inf/NaN") as exc:
        prune_(model, config, example_inputs=x[:2], calibration=[x])
    assert "\n" not in str(exc.value)
    assert model[0].out_features == 16
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_a_refit_failing_midway_leaves_the_model_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secateur.pruning._reconstruct import Refitter

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    ).eval()
    weights = [p.detach().clone() for p in model.parameters()]
    refit = Refitter._refit
    calls = []

    def second_fails(self, name, channels, gram):  # noqa: ANN001, ANN202
        calls.append(name)
        if len(calls) == 2:
            raise ConfigError("boom")
        return refit(self, name, channels, gram)

    monkeypatch.setattr(Refitter, "_refit", second_fails)
    x = torch.randn(16, 6)
    with pytest.raises(ConfigError, match="boom"):
        prune_(
            model, StructuredConfig(ratio=0.5, reconstruct=True), example_inputs=x, calibration=[x]
        )
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_statistics_too_large_for_one_pass_are_gathered_over_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secateur.pruning import _reconstruct

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    batches = [x[:32], x[32:]]
    real = _reconstruct._capture

    def pruned(pass_bytes: int) -> tuple[nn.Module, list[list[str]]]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
        ).eval()
        captures: list[list[str]] = []
        monkeypatch.setattr(_reconstruct, "PASS_BYTES", pass_bytes)
        monkeypatch.setattr(
            _reconstruct,
            "_capture",
            lambda m, run, i: captures.append(list(run)) or real(m, run, i),
        )
        config = StructuredConfig(ratio=0.5, criterion="l2", reconstruct=True)
        prune_(model, config, example_inputs=x[:2], calibration=batches)
        return model, captures

    together, one_pass = pruned(2 * 1024**3)
    apart, two_passes = pruned(8 * 13 * 13)  # room for the first reader's H (12 + bias) only
    assert one_pass == [["2", "4"]] * 2  # both readers, once per batch
    assert two_passes == [["2"]] * 2 + [["4"]] * 2  # one reader per pass
    for a, b in zip(together.state_dict().values(), apart.state_dict().values(), strict=True):
        assert torch.equal(a, b)
