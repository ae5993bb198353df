"""Depth pruning from ``secateur compress``: ``--method depth``, ``--depth-ratio`` with
``--method structured``, the YAML key, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur import create_model, load_model, save_model
from secateur.cli._main import main
from secateur.errors import ConfigError
from secateur.export import load_compressed
from secateur.pruning import DepthConfig, Skip, StructuredConfig
from secateur.recipes import CompressConfig, CompressMethod

# resnet20's candidates: layer1.0-2 (same width, identity shortcut), and layer2.1-2, layer3.1-2
# (the first block of layers 2 and 3 downsamples, so it is no candidate)
CANDIDATES = 7


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One baseline cache for the module: the resnet20 baseline is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache_dir(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SECATEUR_CACHE", str(shared_cache))
    return shared_cache


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        *("--data", str(data), "--out", str(out), "--model", "resnet20"),
        *("--epochs", "1", "--finetune-epochs", "0", "--limit", "160"),
        *("--latency-runs", "20", "--no-progress"),
        *extra,
    ]


def _words(text: str) -> str:
    return " ".join(text.split())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _skips(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Skip)]


def _report_row(report: str, label: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in report")


def _same_outputs(loaded: nn.Module, in_memory: nn.Module) -> None:
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), in_memory.cpu().eval()(x))


# --- end to end -------------------------------------------------------------------------------


def test_method_depth_removes_blocks_and_reloads(
    tmp_path: Path,
    digits_idx_shared: Path,
    cache_dir: Path,
    saved: dict[str, nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = _argv(digits_idx_shared, out, "--method", "depth", "--depth-ratio", "0.3")
    argv[argv.index("--finetune-epochs") + 1] = "1"  # fine-tuning runs without masks
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    words = _words(captured.out)
    assert "pruning method: depth" in words
    assert f"removed 2 of {CANDIDATES} residual blocks" in words  # round(0.3 * 7)

    loaded = load_model(out / "pruned.safetensors")
    skipped = _skips(loaded.model)
    assert len(skipped) == 2 and all(name.startswith("layer") for name in skipped)
    manifest = json.loads((out / "pruned.json").read_text(encoding="utf-8"))
    assert manifest["edits"] == {"skipped": skipped}
    assert f"({', '.join(skipped)})" in words
    baseline = load_model(out / "baseline.safetensors").model
    assert _skips(baseline) == []
    assert _params(loaded.model) < _params(baseline)
    _same_outputs(loaded.model, saved["pruned.safetensors"])
    # the lossless compressed copy keeps the skips too
    assert _skips(load_compressed(out / "pruned.secz").model) == skipped

    meta = loaded.metadata
    assert DepthConfig.from_dict(meta["pruning"]) == DepthConfig(ratio=0.3)
    assert (meta["recipe"]["method"], meta["recipe"]["depth_ratio"]) == ("depth", 0.3)
    base_metrics = json.loads((out / "baseline.json").read_text())["metadata"]["metrics"]
    assert meta["metrics"]["params"] == _params(loaded.model) < base_metrics["params"]
    assert meta["metrics"]["macs"] < base_metrics["macs"]

    report = (out / "report.md").read_text(encoding="utf-8")
    assert _report_row(report, "method")[1] == "depth"
    pruning = _report_row(report, "pruning")[1]
    assert "depth_ratio 0.3" in pruning and f"removed 2 of {CANDIDATES} residual blocks" in pruning
    assert _report_row(report, "parameters")[2] == f"{_params(loaded.model):,}"
    assert "Whole residual blocks were replaced by an identity skip" in _words(report)
    assert "does not make this file smaller" not in report


def test_structured_with_depth_ratio_removes_blocks_then_channels(
    tmp_path: Path,
    digits_idx_shared: Path,
    cache_dir: Path,
    saved: dict[str, nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = _argv(
        digits_idx_shared, out, "--method", "structured", "--ratio", "0.5", "--depth-ratio", "0.3"
    )
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    words = _words(captured.out)
    assert f"removed 2 of {CANDIDATES} residual blocks" in words
    assert "then removed" in words and "channels/neurons" in words

    loaded = load_model(out / "pruned.safetensors")
    assert len(_skips(loaded.model)) == 2
    # the remaining blocks are narrower too: the stem's 16 channels lost half
    assert loaded.model.conv1.out_channels == 8
    full = create_model("resnet20")
    depth_only = create_model("resnet20")
    for name in _skips(loaded.model):
        parent, _, child = name.rpartition(".")
        setattr(depth_only.get_submodule(parent), child, Skip())
    assert _params(loaded.model) < _params(depth_only) < _params(full)
    _same_outputs(loaded.model, saved["pruned.safetensors"])

    meta = loaded.metadata
    assert StructuredConfig.from_dict(meta["pruning"]) == StructuredConfig(ratio=0.5)
    assert DepthConfig.from_dict(meta["depth"]) == DepthConfig(ratio=0.3)
    report = (out / "report.md").read_text(encoding="utf-8")
    pruning = _report_row(report, "pruning")[1]
    assert "after depth_ratio 0.3" in pruning and "residual blocks" in pruning
    assert "then whole channels and neurons were removed" in _words(report)


def test_yaml_recipe_depth_ratio(
    tmp_path: Path, digits_idx_shared: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("compress:\n  method: depth\n  depth_ratio: 0.45\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(_argv(digits_idx_shared, out, "--recipe", str(recipe))) == 0
    assert capsys.readouterr().err == ""
    loaded = load_model(out / "pruned.safetensors")
    assert len(_skips(loaded.model)) == 3  # round(0.45 * 7)
    assert DepthConfig.from_dict(loaded.metadata["pruning"]) == DepthConfig(ratio=0.45)


# --- bad input --------------------------------------------------------------------------------


def _lenet5_checkpoint(tmp: Path) -> str:
    return str(save_model(create_model("lenet5"), tmp / "lenet5.safetensors"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            ("--model", "lenet5", "--method", "depth", "--depth-ratio", "0.5"),
            "model lenet5 has no residual blocks to remove: use --method structured or "
            "unstructured",
            id="depth-lenet5",
        ),
        pytest.param(
            ("--model", "lenet5", "--method", "structured", "--depth-ratio", "0.5"),
            "model lenet5 has no residual blocks to remove: drop --depth-ratio",
            id="structured-lenet5",
        ),
        pytest.param(
            ("--baseline", "{ckpt}", "--method", "depth", "--depth-ratio", "0.5"),
            "checkpoint {ckpt} has no residual blocks to remove: use --method structured",
            id="depth-lenet5-checkpoint",
        ),
        pytest.param(
            ("--method", "depth", "--depth-ratio", "0.05"),
            f"--depth-ratio 0.05 removes none of the {CANDIDATES} residual blocks of model "
            "resnet20: pass --depth-ratio 0.08 or more",
            id="ratio-too-small",
        ),
        pytest.param(
            ("--depth-ratio", "0.3"),
            "--depth-ratio applies to --method structured or depth only: drop it, or pass "
            "--method structured",
            id="unstructured",
        ),
        pytest.param(
            ("--method", "sparsegpt", "--depth-ratio", "0.3"),
            "--depth-ratio applies to --method structured or depth only",
            id="sparsegpt",
        ),
        pytest.param(
            ("--method", "depth"),
            "method depth removes depth_ratio of the residual blocks, which is 0: pass "
            "--depth-ratio",
            id="depth-without-ratio",
        ),
        pytest.param(
            ("--method", "depth", "--depth-ratio", "1"),
            "depth_ratio=1.0 is out of range: allowed [0, 1)",
            id="ratio-one",
        ),
        pytest.param(
            ("--method", "depth", "--depth-ratio", "0.3", "--prune-schedule", "iterative"),
            "method depth removes whole blocks at once: use prune_schedule oneshot",
            id="depth-iterative",
        ),
    ],
)
def test_bad_depth_input_exits_2_before_training(
    tmp_path: Path,
    digits_idx_shared: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    ckpt = _lenet5_checkpoint(tmp_path)
    extra = tuple(arg.replace("{ckpt}", ckpt) for arg in extra)
    out = tmp_path / "out"
    cached = set(cache_dir.iterdir())
    assert main(_argv(digits_idx_shared, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("secateur: error: ") and err.count("\n") == 1
    assert message.replace("{ckpt}", ckpt) in err
    # nothing was trained, cached or written
    assert set(cache_dir.iterdir()) == cached
    assert not out.exists() or list(out.iterdir()) == []


def test_recipe_depth_ratio_with_unstructured_method_exits_2(
    tmp_path: Path, digits_idx_shared: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("depth_ratio: 0.3\n", encoding="utf-8")
    assert main(_argv(digits_idx_shared, tmp_path / "out", "--recipe", str(recipe))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"recipe {recipe} sets 'depth_ratio', which applies to method structured or depth" in err
    assert "remove 'depth_ratio' or set method: structured" in err


def test_compress_config_depth() -> None:
    assert CompressConfig().depth_ratio == 0.0
    config = CompressConfig(model="resnet20", method="depth", depth_ratio=0.25)
    assert config.method is CompressMethod.DEPTH
    assert config.pruning() == config.depth_pruning() == DepthConfig(ratio=0.25)
    assert CompressConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    both = CompressConfig(method="structured", ratio=0.4, depth_ratio=0.5)
    assert both.pruning() == StructuredConfig(ratio=0.4)
    assert both.depth_pruning() == DepthConfig(ratio=0.5)
    for bad in (-0.1, 1.0, float("nan"), "0.2", True):
        with pytest.raises(ConfigError, match="depth_ratio"):
            CompressConfig(method="structured", depth_ratio=bad)
    with pytest.raises(ConfigError, match="--depth-ratio"):
        CompressConfig(method="depth")
