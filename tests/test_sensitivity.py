"""Sensitivity scans, ratio allocation, the sensitivity plot and ``secateur sensitivity``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur.cli._main import main
from secateur.errors import ConfigError
from secateur.explore import (
    LayerCurve,
    SensitivityResult,
    allocate_ratios,
    predicted_savings,
    sensitivity_scan,
)
from secateur.measure import count_macs
from secateur.pruning import StructuredConfig, UnstructuredConfig, prunable_weights, prune_
from secateur.report import plot_sensitivity


def fragile_mlp() -> nn.Sequential:
    """Layer ``0`` is fragile: all its weights are ±0.5, so magnitude has nothing to go on and
    any pruned half matters. Layer ``2`` is robust: three quarters of its weights are ~1e-3."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[0].weight.copy_(0.5 * torch.sign(torch.randn(16, 8)))
        w = torch.randn(16, 16)
        small = torch.rand(16, 16) < 0.75
        net[2].weight.copy_(torch.where(small, 1e-3 * w, w))
    return net.eval()


def output_score(net: nn.Module) -> tuple[callable, torch.Tensor]:
    """``score(model) = -MSE`` to the unpruned outputs on fixed inputs (baseline exactly 0)."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)

    def score(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(x) - ref).pow(2).mean())

    return score, x


def synthetic(names: list[str], worst_first: bool = True) -> SensitivityResult:
    """An unstructured result whose layer ``i`` drops ``(i + 1) * r`` (more for later names)."""
    ratios = (0.25, 0.5, 0.75)
    layers = []
    for i, name in enumerate(names):
        drops = tuple((i + 1) * r for r in ratios)
        layers.append(
            LayerCurve(name, "weights", 100, tuple(-d for d in drops), drops, (25, 50, 75))
        )
    return SensitivityResult(
        "unstructured", "magnitude", 0.0, ratios, tuple(layers), 100 * len(names)
    )


# --- the scan -----------------------------------------------------------------------------


def test_scan_gives_the_fragile_layer_the_larger_drop() -> None:
    net = fragile_mlp()
    score, _ = output_score(net)
    result = sensitivity_scan(net, score, ratios=(0.25, 0.5, 0.75), progress=False)
    assert result.names == ("0", "2", "4")
    assert result.baseline == 0.0
    for r in result.ratios:
        assert result.drop("0", r) > 10 * result.drop("2", r) > 0
    # every drop is the baseline minus the score at that point
    for layer in result.layers:
        assert layer.drops == tuple(result.baseline - s for s in layer.scores)


def test_scan_restores_weights_bit_exactly_and_counts_removed_weights() -> None:
    net = fragile_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    score, _ = output_score(net)
    result = sensitivity_scan(net, score, ratios=(0.0, 0.3, 0.9), progress=False)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for layer in result.layers:
        n = dict(prunable_weights(net))[f"{layer.name}.weight"].weight.numel()
        assert layer.size == n
        assert layer.cost_saved == (0, round(0.3 * n), round(0.9 * n))
        # ratio 0 prunes nothing: the score is the baseline exactly
        assert layer.scores[0] == result.baseline and layer.drops[0] == 0.0
    assert result.total_cost == sum(layer.size for layer in result.layers)


def test_a_ratio_too_small_to_remove_a_weight_leaves_the_baseline() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))  # 4 and 2 weights

    def score(model: nn.Module) -> float:
        with torch.no_grad():
            return float(model(torch.ones(3, 2)).sum())

    result = sensitivity_scan(net, score, ratios=(0.1, 0.5), progress=False)
    for layer in result.layers:
        assert layer.cost_saved[0] == 0 and layer.drops[0] == 0.0
        assert layer.cost_saved[1] == round(0.5 * layer.size)


def test_scan_rejects_bad_input() -> None:
    net = fragile_mlp()
    score, _ = output_score(net)
    with pytest.raises(ConfigError, match="strictly increasing"):
        sensitivity_scan(net, score, ratios=(0.5, 0.2), progress=False)
    with pytest.raises(ConfigError, match="ratios"):
        sensitivity_scan(net, score, ratios=(0.5, 1.0), progress=False)
    with pytest.raises(ConfigError, match="criterion"):
        sensitivity_scan(net, score, criterion="nope", progress=False)
    with pytest.raises(ConfigError, match="finite number"):
        sensitivity_scan(net, lambda m: float("nan"), progress=False)
    with pytest.raises(ConfigError, match="example_inputs"):
        sensitivity_scan(net, score, method="structured", progress=False)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    ).eval()


def test_structured_scan_on_a_small_cnn() -> None:
    net = small_cnn()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)

    def score(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(x) - ref).pow(2).mean())

    before = copy.deepcopy(net.state_dict())
    result = sensitivity_scan(
        net, score, method="structured", ratios=(0.0, 0.5), example_inputs=x[:1], progress=False
    )
    assert result.cost_unit == "MACs"
    assert result.names == ("0", "3", "7")
    assert [layer.size for layer in result.layers] == [8, 16, 12]
    assert result.total_cost == count_macs(net, x[:1]).dense
    # the model itself was never cut
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for layer in result.layers:
        assert layer.cost_saved[0] == 0 and layer.drops[0] == 0.0
        # the MACs saved at 0.5 are those of that group alone pruned at 0.5
        pruned = copy.deepcopy(net)
        prune_(
            pruned,
            StructuredConfig(ratio=0.0, per_layer={layer.name: 0.5}, criterion="magnitude"),
            example_inputs=x[:1],
        )
        assert layer.cost_saved[1] == result.total_cost - count_macs(pruned, x[:1]).dense > 0
        assert layer.drops[1] == pytest.approx(-score(pruned))
    alloc = allocate_ratios(result, target_macs_reduction=1.3, max_ratio=0.5)
    assert set(alloc) == set(result.names)
    assert predicted_savings(result, alloc) >= 1.3


# --- allocation ---------------------------------------------------------------------------


def test_allocation_meets_the_target_and_the_robust_layer_gives_more() -> None:
    net = fragile_mlp()
    score, _ = output_score(net)
    ratios = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    result = sensitivity_scan(net, score, ratios=ratios, progress=False)
    alloc = allocate_ratios(result, target_sparsity=0.5)
    assert set(alloc) == {"0", "2", "4"}
    assert predicted_savings(result, alloc) >= 0.5
    assert predicted_savings(result, alloc) == pytest.approx(0.5, abs=1e-4)
    assert alloc["2"] > alloc["0"]
    assert all(0.0 <= r <= 0.9 for r in alloc.values())
    # usable as per_layer: pruning with it removes (up to rounding) the target fraction
    pruned = copy.deepcopy(net)
    masks = prune_(pruned, UnstructuredConfig(sparsity=0.0, scope="layer", per_layer=alloc))
    assert masks.sparsity() == pytest.approx(0.5, abs=2 / result.total_cost)


def test_allocation_is_exact_on_a_known_curve() -> None:
    result = synthetic(["a", "b"])  # a drops r, b drops 2r; 100 weights each
    alloc = allocate_ratios(result, target_sparsity=0.3)
    # equal tolerance tau: r_a = tau, r_b = tau / 2, and (r_a + r_b) / 2 = 0.3 → tau = 0.4
    assert alloc == pytest.approx({"a": 0.4, "b": 0.2}, abs=2e-6)
    assert allocate_ratios(result, target_sparsity=0.0) == {"a": 0.0, "b": 0.0}


def test_impossible_or_mismatched_targets_raise() -> None:
    result = synthetic(["a", "b"])  # scanned up to 0.75
    with pytest.raises(ConfigError, match="reachable maximum is 0.6"):
        allocate_ratios(result, target_sparsity=0.7, max_ratio=0.6)
    with pytest.raises(ConfigError, match="reachable maximum is 0.75"):
        allocate_ratios(result, target_sparsity=0.9)
    with pytest.raises(ConfigError, match="structured scan"):
        allocate_ratios(result, target_macs_reduction=2.0)
    with pytest.raises(ConfigError, match="exactly one"):
        allocate_ratios(result)
    with pytest.raises(ConfigError, match="exactly one"):
        allocate_ratios(result, target_sparsity=0.2, target_macs_reduction=2.0)


# --- the value, its JSON and its plot -----------------------------------------------------


def test_result_round_trips_through_json_and_interpolates() -> None:
    net = fragile_mlp()
    score, _ = output_score(net)
    result = sensitivity_scan(net, score, ratios=(0.2, 0.6), progress=False, score_label="-MSE")
    again = SensitivityResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    layer = result.layer("0")
    assert result.drop("0", 0.6) == layer.drops[1]
    assert result.drop("0", 0.4) == pytest.approx((layer.drops[0] + layer.drops[1]) / 2)
    assert result.drop("0", 0.1) == pytest.approx(layer.drops[0] / 2)  # through (0, 0)
    with pytest.raises(ConfigError, match="beyond the largest scanned ratio"):
        result.drop("0", 0.7)
    with pytest.raises(ConfigError, match="was not scanned"):
        result.drop("nope", 0.2)
    with pytest.raises(ConfigError, match="not a secateur sensitivity result"):
        SensitivityResult.from_dict({"layers": []})
    broken = result.to_dict()
    broken["layers"][0]["scores"] = broken["layers"][0]["scores"][:1]
    with pytest.raises(ConfigError, match="one entry per ratio"):
        SensitivityResult.from_dict(broken)


def test_plot_is_written_as_png_or_svg(tmp_path: Path) -> None:
    png = plot_sensitivity(synthetic(["a", "b", "c"]), tmp_path / "s.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    with pytest.raises(ConfigError, match=r"\.png or \.svg"):
        plot_sensitivity(synthetic(["a"]), tmp_path / "s.jpg")
    assert not (tmp_path / "s.jpg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no temp file left behind


def test_plot_labels_only_the_twelve_most_sensitive_layers(tmp_path: Path) -> None:
    names = [f"L{i:02d}x" for i in range(15)]  # later names drop more
    svg = plot_sensitivity(synthetic(names), tmp_path / "s.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml")
    assert all(name in svg for name in names[3:])
    assert not any(name in svg for name in names[:3])
    assert "3 less sensitive layers" in svg
    assert "drop in score" in svg and "% of the layer" in svg  # axes say what and in what unit


# --- the command line ---------------------------------------------------------------------


def _argv(data: Path, out: Path, *extra: str, ratios: str | None = "0.3,0.9") -> list[str]:
    argv = ["sensitivity", "--model", "lenet_300_100", "--data", str(data), "--limit", "300"]
    argv += ["--epochs", "1", "--out", str(out), "--threads", "1", "--no-progress"]
    return argv + (["--ratios", ratios] if ratios else []) + list(extra)


def test_cli_end_to_end(digits_idx_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    assert main(_argv(digits_idx_dir, out, "--target-sparsity", "0.6")) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "sensitivity.json",
        "sensitivity.md",
        "sensitivity.png",
    ]
    saved = json.loads((out / "sensitivity.json").read_text(encoding="utf-8"))
    result = SensitivityResult.from_dict(saved)
    assert result.names == ("fc1", "fc2", "fc3") and result.ratios == (0.3, 0.9)
    assert 0.0 <= result.baseline <= 100.0
    alloc = saved["job"]["allocation"]
    assert set(alloc) == set(result.names)
    assert predicted_savings(result, alloc) >= 0.6
    # the allocation was applied and measured: sparsity within rounding of the target
    assert saved["job"]["allocation_check"]["measured_savings"] == pytest.approx(0.6, abs=1e-4)
    report = (out / "sensitivity.md").read_text(encoding="utf-8")
    assert "## Allocated per-layer ratios" in report and "| fc1 |" in report
    assert (out / "sensitivity.png").read_bytes().startswith(b"\x89PNG")
    # a second run, set up by a recipe, reuses the cached baseline and scores it the same way
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sensitivity:\n  ratios: [0.5]\n  target_sparsity: 0.4\n", encoding="utf-8")
    again = tmp_path / "again"
    argv = _argv(digits_idx_dir, again, "--recipe", str(recipe), "--target-macs", "2", ratios=None)
    assert main(argv) == 2  # the flag's target replaces the recipe's: macs need structured
    assert main(_argv(digits_idx_dir, again, "--recipe", str(recipe), ratios=None)) == 0
    second = json.loads((again / "sensitivity.json").read_text(encoding="utf-8"))
    assert "reused from cache" in second["job"]["baseline_source"]
    assert second["ratios"] == [0.5] and second["baseline"] == saved["baseline"]
    assert second["job"]["recipe"]["target_sparsity"] == 0.4
    # a run with no target writes no allocation
    third = tmp_path / "third"
    assert main(_argv(digits_idx_dir, third)) == 0
    assert json.loads((third / "sensitivity.json").read_text())["job"]["allocation"] is None
    assert "Allocated" not in (third / "sensitivity.md").read_text(encoding="utf-8")


def test_cli_structured_allocates_for_a_mac_target(
    digits_idx_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    out = tmp_path / "out"
    argv = _argv(digits_idx_dir, out, "--method", "structured", "--target-macs", "1.3")
    argv[argv.index("lenet_300_100")] = "lenet5"
    assert main(argv) == 0
    saved = json.loads((out / "sensitivity.json").read_text(encoding="utf-8"))
    result = SensitivityResult.from_dict(saved)
    assert result.cost_unit == "MACs" and result.names == ("conv1", "conv2", "fc1", "fc2")
    assert predicted_savings(result, saved["job"]["allocation"]) >= 1.3
    # measured on the baseline pruned with the allocation: whole units, so near the target
    assert saved["job"]["allocation_check"]["measured_savings"] > 1.15
    assert "`StructuredConfig`" in (out / "sensitivity.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratios", "0.3,abc"], "--ratios item 'abc' is not a number"),
        (["--ratios", "0.9,0.3"], "strictly increasing"),
        (["--method", "structured", "--target-sparsity", "0.5"], "needs method unstructured"),
        (["--target-macs", "2"], "needs method structured"),
        (["--criterion", "nope"], "unknown criterion 'nope'"),
        (["--target-sparsity", "0.99", "--max-ratio", "0.5"], "reachable maximum"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    digits_idx_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main(_argv(digits_idx_dir, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sensitivity", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
