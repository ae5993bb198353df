"""SparseGPT: reconstruction beats magnitude, exact sparsity patterns, inputs and errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur.data import load_fashion_mnist
from secateur.errors import ConfigError
from secateur.pruning import MaskSet, UnstructuredConfig, prune_
from secateur.pruning._sparsegpt import (
    SparseGPTConfig,
    _prunable,
    _record_steps,
    prune_sparsegpt_,
)


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """X = Z·A: features of very different scales, mixed by a dense matrix (not i.i.d.).

    ``A`` is the same for every ``seed`` (one distribution), ``Z`` is drawn from ``seed``.
    """
    a = torch.eye(d) + 0.2 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return (z * torch.logspace(-1, 1, d)) @ a


def _nm_magnitude_keep(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask dropping the ``n`` smallest |w| of every run of ``m`` input columns per row."""
    rows = weight.shape[0]
    runs = weight.detach().abs().reshape(rows, -1, m)
    lowest = runs.topk(n, dim=-1, largest=False).indices
    keep = torch.ones_like(runs, dtype=torch.bool).scatter_(-1, lowest, False)
    return keep.reshape(weight.shape)


def _nm_magnitude_(model: nn.Module, n: int, m: int) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                flat = module.weight.reshape(module.weight.shape[0], -1)
                flat.mul_(_nm_magnitude_keep(flat, n, m))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 12)
    )


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding="same"),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


def _assert_masks_match(model: nn.Module, masks: MaskSet) -> None:
    for name, keep in masks.masks.items():
        assert bool((model.get_parameter(name)[~keep] == 0).all()), name


# --- the solver on one layer -----------------------------------------------------------------


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_linear_reconstruction_beats_magnitude(nm: str | None) -> None:
    x = _correlated(2048, 128, seed=1)
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)
    dense = layer.weight.detach().clone()
    masks = prune_sparsegpt_(layer, SparseGPTConfig(sparsity=0.5, nm=nm), [x[:1024], x[1024:]])
    if nm is None:
        threshold = dense.abs().flatten().kthvalue(dense.numel() // 2).values
        magnitude = dense * (dense.abs() > threshold)
    else:
        magnitude = dense * _nm_magnitude_keep(dense, 2, 4)
    err_sparsegpt = (x @ (dense - layer.weight.detach()).t()).norm()
    err_magnitude = (x @ (dense - magnitude).t()).norm()
    assert err_sparsegpt < 0.75 * err_magnitude
    assert masks.sparsity() == 0.5
    assert int((layer.weight == 0).sum()) >= dense.numel() // 2
    _assert_masks_match(layer, masks)


def test_blocksize_does_not_change_sparsity_count() -> None:
    x = _correlated(512, 40, seed=2)
    for blocksize in (1, 7, 16, 128):
        torch.manual_seed(0)
        layer = nn.Linear(40, 9)
        masks = prune_sparsegpt_(layer, SparseGPTConfig(sparsity=0.3, blocksize=blocksize), [x])
        assert int((~masks.masks["weight"]).sum()) == round(0.3 * 40 * 9)


# --- patterns, per_layer, exclude ------------------------------------------------------------


def test_exact_layer_sparsity_per_layer_and_exclude() -> None:
    model = _mlp()
    fc3 = model[4].weight.detach().clone()
    config = SparseGPTConfig(sparsity=0.5, exclude=("4",), per_layer={"2": 0.75, "*": 0.25})
    masks = prune_sparsegpt_(model, config, [_correlated(256, 64, seed=3)])
    assert set(masks.masks) == {"0.weight", "2.weight"}
    assert int((~masks.masks["0.weight"]).sum()) == round(0.25 * 96 * 64)
    assert int((~masks.masks["2.weight"]).sum()) == round(0.75 * 64 * 96)
    assert torch.equal(model[4].weight, fc3)
    _assert_masks_match(model, masks)


@pytest.mark.parametrize(("nm", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:3", 1, 3)])
def test_nm_holds_exactly(nm: str, n: int, m: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 6)
    )
    x = torch.randn(32, 8, 6, 6)
    masks = prune_sparsegpt_(model, SparseGPTConfig(nm=nm, blocksize=10), [x])
    for name, keep in masks.masks.items():
        weight = model.get_parameter(name).detach()
        runs = keep.reshape(keep.shape[0], -1, m)
        assert bool((runs.sum(-1) == n).all()), name  # N of every M kept
        zero_runs = (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)
        assert bool((zero_runs >= m - n).all()), name
    assert masks.sparsity() == pytest.approx(1 - n / m)
    _assert_masks_match(model, masks)


def test_per_layer_overrides_nm_and_zero_keeps_the_layer() -> None:
    model = _mlp()
    fc1 = model[0].weight.detach().clone()
    config = SparseGPTConfig(nm="2:4", per_layer={"0": 0.0, "4": 0.5})
    masks = prune_sparsegpt_(model, config, [_correlated(128, 64, seed=4)])
    assert torch.equal(model[0].weight, fc1)
    assert bool(masks.masks["0.weight"].all())
    assert int((~masks.masks["4.weight"]).sum()) == round(0.5 * 12 * 64)
    runs = (~masks.masks["2.weight"]).reshape(64, -1, 4).sum(-1)
    assert bool((runs == 2).all())


# --- whole models ----------------------------------------------------------------------------


def _output_gap(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).norm())


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_mlp_output_closer_to_dense_than_magnitude(nm: str | None) -> None:
    dense = _mlp()
    calibration = [_correlated(256, 64, seed=s) for s in (5, 6)]
    held_out = _correlated(256, 64, seed=7)
    model, magnitude = _mlp(), _mlp()
    masks = prune_sparsegpt_(model, SparseGPTConfig(sparsity=0.5, nm=nm), calibration)
    if nm is None:
        prune_(magnitude, UnstructuredConfig(sparsity=0.5, scope="layer"))
    else:
        _nm_magnitude_(magnitude, 2, 4)
    assert _output_gap(model, dense, held_out) < 0.8 * _output_gap(magnitude, dense, held_out)
    assert masks.sparsity() == 0.5
    _assert_masks_match(model, masks)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_dense_targets_bring_the_output_closer_to_dense(nm: str | None) -> None:
    """Reconstructing the dense model's layer outputs lets later layers correct the error of
    earlier ones: the network's output ends closer to the dense one's than with plain
    SparseGPT, at the same sparsity."""
    dense = _mlp()
    calibration = [_correlated(256, 64, seed=s) for s in (5, 6)]
    held_out = _correlated(256, 64, seed=7)
    plain, corrected = _mlp(), _mlp()
    prune_sparsegpt_(plain, SparseGPTConfig(sparsity=0.6, nm=nm), calibration)
    masks = prune_sparsegpt_(
        corrected, SparseGPTConfig(sparsity=0.6, nm=nm, dense_targets=True), calibration
    )
    assert _output_gap(corrected, dense, held_out) < 0.95 * _output_gap(plain, dense, held_out)
    assert masks.sparsity() == pytest.approx(0.6 if nm is None else 0.5, abs=1e-3)
    _assert_masks_match(corrected, masks)


def test_dense_targets_leave_a_single_layer_as_plain_sparsegpt() -> None:
    """With nothing pruned before it, a layer's dense and pruned inputs coincide (C = H): the
    retarget leaves W as it is, so the result is plain SparseGPT's."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    twin = nn.Linear(32, 16)
    twin.load_state_dict(layer.state_dict())
    calibration = [_correlated(128, 32, seed=1)]
    prune_sparsegpt_(layer, SparseGPTConfig(sparsity=0.5), calibration)
    prune_sparsegpt_(twin, SparseGPTConfig(sparsity=0.5, dense_targets=True), calibration)
    torch.testing.assert_close(twin.weight, layer.weight)


def test_cnn_with_split_calibration_beats_magnitude(digits_idx_dir: Path) -> None:
    splits = load_fashion_mnist(digits_idx_dir, limit=600)
    dense = _cnn()
    model, magnitude = _cnn(), _cnn()
    config = SparseGPTConfig(sparsity=0.6, max_batches=3)
    masks = prune_sparsegpt_(model, config, splits.train)
    prune_(magnitude, UnstructuredConfig(sparsity=0.6, scope="layer"))
    x = splits.test.images[:256]
    assert _output_gap(model, dense, x) < 0.8 * _output_gap(magnitude, dense, x)
    assert set(masks.masks) == {"0.weight", "2.weight", "4.weight", "7.weight"}
    for name, keep in masks.masks.items():
        assert int((~keep).sum()) == round(0.6 * keep.numel()), name
    _assert_masks_match(model, masks)


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_sequential_passes_stop_early_and_modes_restored() -> None:
    torch.manual_seed(0)
    counter = _Counter()
    model = nn.Sequential(nn.Linear(16, 16), counter, nn.Dropout(0.5), nn.Linear(16, 8))
    model.train()
    model[2].eval()
    batches = [torch.randn(32, 16) for _ in range(3)]
    prune_sparsegpt_(model, SparseGPTConfig(), batches)
    # one recording pass, then only the step of the second layer gets past the first layer
    assert counter.calls == 1 + len(batches)
    assert model.training and counter.training and not model[2].training


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return self.o(att @ v)


def test_layers_on_one_input_share_a_step() -> None:
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(4, 10, 16)
    steps, calls = _record_steps(model, dict(model.named_children()), x)
    assert steps == [["q", "k", "v"], ["o"]]
    assert calls == {"q": 1, "k": 1, "v": 1, "o": 1}
    masks = prune_sparsegpt_(model, SparseGPTConfig(), [x])
    assert masks.sparsity() == 0.5
    _assert_masks_match(model, masks)


class _KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(12, 8)
        self.fb = nn.Linear(6, 8)

    def forward(self, *, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fa(a) + self.fb(b)


def test_dict_inputs() -> None:
    torch.manual_seed(0)
    model = _KeywordNet()
    batch = {"a": torch.randn(64, 12), "b": torch.randn(64, 6)}
    masks = prune_sparsegpt_(model, SparseGPTConfig(nm="1:2"), [batch, (batch, None)])
    assert set(masks.masks) == {"fa.weight", "fb.weight"}
    assert masks.sparsity() == 0.5
    _assert_masks_match(model, masks)


class Conv1D(nn.Module):
    """Stand-in for Hugging Face's Conv1D: ``y = x @ W + b`` with ``W`` shaped (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_hf_conv1d_matches_linear() -> None:
    torch.manual_seed(0)
    hf = Conv1D(8, 16)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.copy_(hf.weight.t())
    x = _correlated(3 * 20, 16, seed=8).reshape(3, 20, 16)
    hf_masks = prune_sparsegpt_(hf, SparseGPTConfig(nm="2:4"), [x])
    linear_masks = prune_sparsegpt_(linear, SparseGPTConfig(nm="2:4"), [x])
    assert torch.equal(hf_masks.masks["weight"], linear_masks.masks["weight"].t())
    torch.testing.assert_close(hf.weight.detach(), linear.weight.detach().t())


def test_low_precision_weights_keep_their_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    x = _correlated(128, 32, seed=9).to(torch.bfloat16)
    masks = prune_sparsegpt_(model, SparseGPTConfig(sparsity=0.5), [x])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert masks.sparsity() == 0.5
    _assert_masks_match(model, masks)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_layer_that_never_runs_is_left_dense_with_a_warning() -> None:
    torch.manual_seed(0)
    model = _Unused()
    before = model.unused.weight.detach().clone()
    with pytest.warns(UserWarning, match="unused"):
        masks = prune_sparsegpt_(model, SparseGPTConfig(), [torch.randn(16, 8)])
    assert set(masks.masks) == {"used.weight"}
    assert torch.equal(model.unused.weight, before)


def test_grouped_convs_are_left_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    depthwise = model[0].weight.detach().clone()
    masks = prune_sparsegpt_(model, SparseGPTConfig(), [torch.randn(4, 4, 8, 8)])
    assert set(masks.masks) == {"1.weight"}
    assert torch.equal(model[0].weight, depthwise)


def test_progress_bar_draws() -> None:
    from rich.console import Console

    from secateur.pruning import _sparsegpt

    drawn: list[str] = []
    real = _sparsegpt.make_progress

    def recording(*, enabled: bool = True) -> object:
        console = Console(file=_Sink(drawn), force_terminal=False, width=100)
        return real(enabled=enabled, console=console)

    _sparsegpt.make_progress = recording
    try:
        prune_sparsegpt_(_mlp(), SparseGPTConfig(), [torch.randn(32, 64)], progress=True)
    finally:
        _sparsegpt.make_progress = real
    assert "SparseGPT" in "".join(drawn)
    assert "3/3" in "".join(drawn)


class _Sink:
    def __init__(self, out: list[str]) -> None:
        self.out = out

    def write(self, text: str) -> int:
        self.out.append(text)
        return len(text)

    def flush(self) -> None:
        pass


# --- config and errors -----------------------------------------------------------------------


def test_config_round_trip() -> None:
    config = SparseGPTConfig(
        sparsity=0.4, nm="4:8", blocksize=64, damp=0.05, exclude=["head"], per_layer={"a*": 0.2}
    )
    assert config.exclude == ("head",)
    data = config.to_dict()
    assert data["exclude"] == ["head"] and data["per_layer"] == {"a*": 0.2}
    assert SparseGPTConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"nm": "4:2"},
        {"nm": "0:4"},
        {"nm": "2-4"},
        {"nm": 2},
        {"blocksize": 0},
        {"damp": 0.0},
        {"exclude": "fc3"},
        {"per_layer": {"fc*": 1.5}},
        {"per_layer": [("fc", 0.5)]},
        {"max_batches": 0},
        {"dense_targets": "yes"},
    ],
)
def test_bad_config_values_raise(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SparseGPTConfig(**kwargs)


def test_unknown_field_raises() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        SparseGPTConfig.from_dict({"sparsity": 0.5, "ratio": 0.5})


def test_nm_width_mismatch_names_the_layer_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"layer 2 has 6 input columns.*exclude"):
        prune_sparsegpt_(model, SparseGPTConfig(nm="2:4"), [torch.randn(8, 8)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (None, "calibration"),
        ([], "no batch"),
        (iter([torch.randn(4, 8)]), "re-iterable"),
        ([torch.full((4, 8), float("nan"))], "inf/NaN"),
    ],
)
def test_bad_calibration_raises(calibration: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        prune_sparsegpt_(nn.Linear(8, 4), SparseGPTConfig(), calibration)


def test_no_prunable_layer_left_raises() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    with pytest.raises(ConfigError, match="no Linear"):
        prune_sparsegpt_(model, SparseGPTConfig(exclude=("*",)), [torch.randn(4, 8)])
    with pytest.raises(ConfigError, match="SparseGPTConfig"):
        prune_sparsegpt_(model, UnstructuredConfig(sparsity=0.5), [torch.randn(4, 8)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda() -> None:
    model = _mlp().cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = prune_sparsegpt_(model, SparseGPTConfig(nm="2:4"), [torch.randn(64, 64)])
    assert all(keep.device.type == "cuda" for keep in masks.masks.values())
    assert masks.sparsity() == 0.5
    _assert_masks_match(model, masks)


def test_tiny_llama_groups_projections_and_prunes() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = transformers.LlamaForCausalLM(config)
    calibration = [{"input_ids": torch.randint(0, 100, (4, 16))} for _ in range(2)]
    steps, _ = _record_steps(model, _prunable(model, ()), calibration[0])
    attn = "model.layers.0.self_attn"
    assert steps[0] == [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
    masks = prune_sparsegpt_(model, SparseGPTConfig(nm="2:4", exclude=("lm_head",)), calibration)
    assert len(masks.masks) == 2 * 7
    assert masks.sparsity() == 0.5
    _assert_masks_match(model, masks)
