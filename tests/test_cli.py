"""Tests of the ``secateur`` command line: the compress job end to end, recipes, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from secateur import create_model, load_model, save_model
from secateur.cli._main import main
from secateur.errors import ConfigError
from secateur.export import load_compressed
from secateur.pruning import StructuredConfig, UnstructuredConfig
from secateur.pruning._unstructured import PRUNABLE_TYPES
from secateur.recipes import CompressConfig, CompressMethod

OUTPUT_FILES = [
    "baseline.json",
    "baseline.safetensors",
    "pruned.json",
    "pruned.safetensors",
    "pruned.secz",
    "report.md",
]


def _compress_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--sparsity",
        "0.8",
        "--latency-runs",
        "20",
        "--no-progress",
        "--model",
        "lenet_300_100",
        *extra,
    ]


def _prunable(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _report_row(report: str, label: str) -> list[str]:
    """Cells of the Markdown table row whose first cell is ``label``."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in report")


def _words(text: str) -> str:
    """Collapse the console's line wrapping."""
    return " ".join(text.split())


# --- end to end -------------------------------------------------------------------------------


def test_compress_end_to_end_then_reuses_cached_baseline(
    tmp_path: Path, digits_idx_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = _compress_argv(digits_idx_dir, out)

    assert main(argv) == 0
    first = capsys.readouterr()
    assert "Traceback" not in first.out + first.err
    assert first.err == ""
    assert "trained here for 2 epochs" in _words(first.out)
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES

    # The pruned model really is 80% zeros over all Linear/Conv weights (global threshold).
    pruned_path = out / "pruned.safetensors"
    loaded = load_model(pruned_path)
    weights = _prunable(loaded.model)
    assert len(weights) == 3  # fc1, fc2, fc3
    total_prunable = sum(w.numel() for w in weights)
    assert total_prunable == 784 * 300 + 300 * 100 + 100 * 10
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.8 * total_prunable)
    # Biases are not pruned.
    biases = [m.bias for m in loaded.model.modules() if isinstance(m, nn.Linear)]
    assert all(int((b == 0).sum()) == 0 for b in biases)

    # The lossless compressed copy reloads bit-identical and is far smaller than the dense file.
    secz = out / "pruned.secz"
    restored = load_compressed(secz).model.state_dict()
    assert all(torch.equal(t, restored[k]) for k, t in loaded.model.state_dict().items())
    assert secz.stat().st_size < 0.3 * pruned_path.stat().st_size
    assert f"{secz.stat().st_size:,} B on disk" in (out / "report.md").read_text()

    params = sum(p.numel() for p in loaded.model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in loaded.model.parameters())
    assert params == 266_610
    assert nonzero == params - zeros

    pruned_meta = loaded.metadata
    assert pruned_meta == _manifest(out / "pruned.json")["metadata"]
    metrics = pruned_meta["metrics"]
    assert metrics["params"] == params
    assert metrics["nonzero_params"] == nonzero
    assert metrics["disk_bytes"] == pruned_path.stat().st_size
    assert metrics["onnx_latency"]["runtime"].startswith("onnxruntime")  # timed beside PyTorch
    assert "latency, ONNX Runtime median" in (out / "report.md").read_text()
    assert metrics["accuracy"]["split"] == "test"
    assert metrics["accuracy"]["samples"] == 297
    assert metrics["accuracy"]["top1"] > 0.5
    assert metrics["latency"]["runs"] == 20
    assert pruned_meta["recipe"]["sparsity"] == 0.8
    assert pruned_meta["recipe"]["model"] == "lenet_300_100"
    assert pruned_meta["pruning"]["sparsity"] == 0.8
    layer_zeros = sum(layer["params"] - layer["nonzero"] for layer in metrics["layers"])
    assert layer_zeros == zeros

    baseline = load_model(out / "baseline.safetensors")
    base_metrics = baseline.metadata["metrics"]
    base_nonzero = sum(int((p != 0).sum()) for p in baseline.model.parameters())
    assert base_metrics["nonzero_params"] == base_nonzero == params
    assert base_metrics["disk_bytes"] == (out / "baseline.safetensors").stat().st_size
    base_top1 = base_metrics["accuracy"]["top1"]
    assert base_top1 > 0.5
    # Global magnitude pruning: every zeroed position held a baseline weight no larger in
    # magnitude than any kept one, whatever layer it sits in.
    base_weights = _prunable(baseline.model)
    pruned_mags = torch.cat([b[w == 0].abs() for w, b in zip(weights, base_weights, strict=True)])
    kept_mags = torch.cat([b[w != 0].abs() for w, b in zip(weights, base_weights, strict=True)])
    assert pruned_mags.numel() == zeros
    assert float(pruned_mags.max()) <= float(kept_mags.min())

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "non-zero parameters" in report
    row = _report_row(report, "non-zero parameters")
    assert row[1:3] == [f"{params:,}", f"{nonzero:,}"]
    assert _report_row(report, "parameters")[1:3] == [f"{params:,}", f"{params:,}"]
    assert _report_row(report, "weights file on disk")[2] == f"{metrics['disk_bytes']:,} B"
    assert _report_row(report, "top-1 accuracy")[1:3] == [
        f"{base_top1:.2%}",
        f"{metrics['accuracy']['top1']:.2%}",
    ]
    assert _report_row(report, "latency, median")[2] == f"{metrics['latency']['median_ms']:.3f} ms"

    cached = sorted(p.name for p in cache_dir.iterdir())
    assert len(cached) == 2
    assert cached[0].startswith("baseline-lenet_300_100-") and cached[0].endswith(".json")
    assert cached[1] == cached[0][: -len(".json")] + ".safetensors"
    baseline_bytes = (out / "baseline.safetensors").read_bytes()

    # Second run, same settings, same --out: the baseline comes from the cache.
    assert main(argv) == 0
    second = capsys.readouterr()
    assert "reused from cache" in _words(second.out)
    assert "trained here" not in _words(second.out)
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert sorted(p.name for p in cache_dir.iterdir()) == cached
    assert (out / "baseline.safetensors").read_bytes() == baseline_bytes
    again = _manifest(out / "baseline.json")["metadata"]["metrics"]
    assert again["accuracy"]["top1"] == base_top1
    assert again["nonzero_params"] == base_metrics["nonzero_params"]
    reloaded = load_model(out / "baseline.safetensors").metadata["metrics"]
    assert reloaded["accuracy"] == base_metrics["accuracy"]


def test_yaml_recipe_with_flag_override(
    tmp_path: Path, digits_idx_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "compress:\n"
        "  sparsity: 0.5\n"
        "  model: lenet_300_100\n"
        "  epochs: 1\n"
        "  finetune_epochs: 1\n"
        "  latency_runs: 20\n"
        "  progress: false\n"
        "  limit: 600\n"
        "  scope: layer\n"
        f"  data: {json.dumps(str(digits_idx_dir))}\n"
        f"  out: {json.dumps(str(out))}\n",
        encoding="utf-8",
    )
    assert main(["compress", "--recipe", str(recipe), "--sparsity", "0.6"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES

    meta = _manifest(out / "pruned.json")["metadata"]
    recipe_meta = meta["recipe"]
    assert recipe_meta["sparsity"] == 0.6  # the flag wins
    assert recipe_meta["model"] == "lenet_300_100"  # the YAML values stay
    assert recipe_meta["epochs"] == 1
    assert recipe_meta["limit"] == 600
    assert recipe_meta["scope"] == "layer"
    assert recipe_meta["progress"] is False
    assert recipe_meta["finetune_epochs"] == 1
    assert recipe_meta["data"] == str(digits_idx_dir)
    assert meta["pruning"]["sparsity"] == 0.6
    # limit caps the test split too: min(600, 297) test images.
    assert meta["metrics"]["accuracy"]["samples"] == 297
    assert meta["data"]["train"] + meta["data"]["val"] == 600

    # Layer scope: every layer is pruned to 60% on its own.
    model = load_model(out / "pruned.safetensors").model
    for w in _prunable(model):
        assert int((w == 0).sum()) == round(0.6 * w.numel())


def test_flat_recipe_without_compress_key_is_read(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "flat.yaml"
    recipe.write_text("sparsity: 1.5\nmodel: lenet5\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secateur: error:")
    assert "sparsity=1.5" in err
    assert not out.exists()


# --- structured -------------------------------------------------------------------------------


def _linear_widths(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_compress_structured_end_to_end(
    tmp_path: Path,
    digits_idx_dir: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    saved: dict[str, nn.Module],
) -> None:
    out = tmp_path / "out"
    argv = [
        *_base(digits_idx_dir, out),
        *("--epochs", "2", "--finetune-epochs", "1", "--method", "structured", "--ratio", "0.5"),
    ]

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "Traceback" not in captured.out
    words = _words(captured.out)
    assert "pruning method: structured" in words
    # lenet_300_100: the fc1 and fc2 output groups (300 and 100 units) lose half each; fc1's
    # input and fc3's output are the model's input and output and stay whole.
    assert "removed 200 of 400 channels/neurons in 2 group(s)" in words
    assert "fc1 (model input)" in words and "fc3 (model output)" in words
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES

    pruned_path = out / "pruned.safetensors"
    loaded = load_model(pruned_path)
    assert _linear_widths(loaded.model) == [(784, 150), (150, 50), (50, 10)]
    params = sum(p.numel() for p in loaded.model.parameters())
    assert params == 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10 == 125_810

    meta = loaded.metadata
    metrics = meta["metrics"]
    base_metrics = _manifest(out / "baseline.json")["metadata"]["metrics"]
    assert base_metrics["params"] == 266_610
    assert metrics["params"] == params < base_metrics["params"]
    assert metrics["macs"] == 784 * 150 + 150 * 50 + 50 * 10 < base_metrics["macs"] == 266_200
    assert metrics["disk_bytes"] == pruned_path.stat().st_size < base_metrics["disk_bytes"]
    assert metrics["accuracy"]["samples"] == 297
    assert metrics["latency"]["runs"] == 20
    assert meta["recipe"]["method"] == "structured"
    assert meta["recipe"]["ratio"] == 0.5
    assert StructuredConfig.from_dict(meta["pruning"]) == StructuredConfig(ratio=0.5)

    # The reloaded file computes exactly what the pruned model in memory computed.
    in_memory = saved["pruned.safetensors"].cpu().eval()
    assert in_memory is not loaded.model
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), in_memory(x))

    report = (out / "report.md").read_text(encoding="utf-8")
    assert _report_row(report, "method")[1] == "structured"
    assert "l2 criterion, layer scope, ratio 0.5" in _report_row(report, "pruning")[1]
    assert _report_row(report, "parameters")[1:3] == ["266,610", "125,810"]
    assert _report_row(report, "MACs (dense kernels)")[1:3] == ["266,200", "125,600"]
    disk = [f"{base_metrics['disk_bytes']:,} B", f"{metrics['disk_bytes']:,} B"]
    assert _report_row(report, "weights file on disk")[1:3] == disk
    assert f"is {disk[1]} against {disk[0]} for the baseline" in report
    lat = [f"{m['latency']['median_ms']:.3f} ms" for m in (metrics, base_metrics)]
    assert f"median latency is {lat[0]} against {lat[1]}" in report
    assert _report_row(report, "latency, median")[1:3] == lat[::-1]
    assert "does not make this file smaller" not in report


def test_structured_yaml_recipe_with_round_to_and_flag_override(
    tmp_path: Path, digits_idx_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "compress:\n  method: structured\n  ratio: 0.5\n  round_to: 8\n  limit: 600\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert main(_base(digits_idx_dir, out, "--recipe", str(recipe), "--ratio", "0.25")) == 0
    assert capsys.readouterr().err == ""

    loaded = load_model(out / "pruned.safetensors")
    # 300 units - 25% = 225 -> 224 and 100 - 25% = 75 -> 72, multiples of 8.
    assert _linear_widths(loaded.model) == [(784, 224), (224, 72), (72, 10)]
    meta = loaded.metadata
    # The flag's ratio wins over the recipe's.
    assert StructuredConfig.from_dict(meta["pruning"]) == StructuredConfig(ratio=0.25, round_to=8)
    assert (meta["recipe"]["method"], meta["recipe"]["limit"]) == ("structured", 600)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "widths rounded down to multiples of 8" in _report_row(report, "pruning")[1]


def test_compress_structured_reconstruct_refits_before_fine_tuning(
    digits_idx_dir: Path, tmp_path: Path
) -> None:
    accuracy = {}
    for flags in ((), ("--reconstruct",)):
        out = tmp_path / f"out{len(flags)}"
        argv = _base(digits_idx_dir, out, "--method", "structured", "--ratio", "0.7", *flags)
        assert main([*argv, "--finetune-epochs", "0", "--limit", "600"]) == 0
        loaded = load_model(out / "pruned.safetensors")
        assert StructuredConfig.from_dict(loaded.metadata["pruning"]).reconstruct == bool(flags)
        accuracy[bool(flags)] = loaded.metadata["metrics"]["accuracy"]["top1"]
        described = _report_row((out / "report.md").read_text(encoding="utf-8"), "pruning")[1]
        assert ("refitted by least squares" in described) == bool(flags)
    assert accuracy[True] > accuracy[False]  # measured one-shot, before any fine-tuning


def test_compress_recalibrates_batchnorm_after_pruning(
    digits_idx_dir: Path, tmp_path: Path
) -> None:
    states, described = {}, {}
    for flags in (("--no-recalibrate-bn",), ()):
        out = tmp_path / f"out{len(flags)}"
        argv = _base(digits_idx_dir, out, "--model", "resnet20", "--method", "structured", *flags)
        assert main([*argv, "--ratio", "0.5", "--limit", "300"]) == 0
        states[not flags] = load_model(out / "pruned.safetensors").model.state_dict()
        report = (out / "report.md").read_text(encoding="utf-8")
        described[not flags] = _report_row(report, "pruning")[1]
    assert "BatchNorm statistics re-estimated on 8 calibration batches" in described[True]
    assert "BatchNorm" not in described[False]
    # the same baseline pruned alike: only the BatchNorm statistics differ
    changed = {k for k, v in states[True].items() if not torch.equal(v, states[False][k])}
    assert changed and all(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed
    )
    # a model without BatchNorm: nothing to re-estimate, and the report does not claim it
    out = tmp_path / "lenet"
    assert main(_base(digits_idx_dir, out, "--limit", "300")) == 0
    assert "BatchNorm" not in _report_row((out / "report.md").read_text(), "pruning")[1]


def test_compress_config_method() -> None:
    default = CompressConfig()
    assert default.method is CompressMethod.UNSTRUCTURED
    assert isinstance(default.pruning(), UnstructuredConfig)
    config = CompressConfig(method="structured", ratio=0.3, round_to=4)
    assert config.method is CompressMethod.STRUCTURED
    assert config.pruning() == StructuredConfig(ratio=0.3, round_to=4)
    assert CompressConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="method='channels' is not allowed"):
        CompressConfig(method="channels")
    with pytest.raises(ConfigError, match="round_to=0"):
        CompressConfig(method="structured", round_to=0)


# --- bad input --------------------------------------------------------------------------------

Case = Callable[[Path, Path], tuple[list[str], Path]]


def _base(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "lenet_300_100",
        "--epochs",
        "1",
        "--finetune-epochs",
        "0",
        "--latency-runs",
        "20",
        "--no-progress",
        *extra,
    ]


def _flag(*extra: str) -> Case:
    def build(tmp: Path, data: Path) -> tuple[list[str], Path]:
        out = tmp / "out"
        return _base(data, out, *extra), out

    return build


def _empty_data(tmp: Path, data: Path) -> tuple[list[str], Path]:
    empty = tmp / "empty"
    empty.mkdir()
    out = tmp / "out"
    return _base(empty, out), out


def _truncated(name: str) -> Case:
    def build(tmp: Path, data: Path) -> tuple[list[str], Path]:
        broken = tmp / "broken"
        shutil.copytree(data, broken)
        target = broken / name
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2])
        out = tmp / "out"
        return _base(broken, out), out

    return build


def _garbage_baseline(tmp: Path, data: Path) -> tuple[list[str], Path]:
    ckpt = tmp / "garbage.safetensors"
    ckpt.write_bytes(os.urandom(4096))
    out = tmp / "out"
    return _base(data, out, "--baseline", str(ckpt)), out


def _garbage_baseline_with_manifest(tmp: Path, data: Path) -> tuple[list[str], Path]:
    ckpt = save_model(create_model("lenet_300_100"), tmp / "ckpt.safetensors")
    ckpt.write_bytes(os.urandom(4096))
    out = tmp / "out"
    return _base(data, out, "--baseline", str(ckpt)), out


def _missing_baseline(tmp: Path, data: Path) -> tuple[list[str], Path]:
    out = tmp / "out"
    return _base(data, out, "--baseline", str(tmp / "nope.safetensors")), out


def _baseline_for_other_images(tmp: Path, data: Path) -> tuple[list[str], Path]:
    ckpt = save_model(create_model("lenet_300_100", image_size=32), tmp / "c32.safetensors")
    out = tmp / "out"
    return _base(data, out, "--baseline", str(ckpt)), out


def _out_under_file(tmp: Path, data: Path) -> tuple[list[str], Path]:
    blocker = tmp / "f"
    blocker.write_text("not a folder")
    out = blocker / "sub"
    return _base(data, out), out


def _recipe(text: str) -> Case:
    def build(tmp: Path, data: Path) -> tuple[list[str], Path]:
        recipe = tmp / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8")
        out = tmp / "out"
        return _base(data, out, "--recipe", str(recipe)), out

    return build


def _recipe_and_flags(text: str, *extra: str) -> Case:
    def build(tmp: Path, data: Path) -> tuple[list[str], Path]:
        recipe = tmp / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8")
        out = tmp / "out"
        return _base(data, out, "--recipe", str(recipe), *extra), out

    return build


def _missing_recipe(tmp: Path, data: Path) -> tuple[list[str], Path]:
    out = tmp / "out"
    return _base(data, out, "--recipe", str(tmp / "nope.yaml")), out


BAD_INPUT: list[Any] = [
    pytest.param(_flag("--sparsity", "1.0"), ["sparsity=1.0"], id="sparsity-1"),
    pytest.param(_flag("--sparsity", "-0.1"), ["sparsity=-0.1"], id="sparsity-negative"),
    pytest.param(_flag("--sparsity", "nan"), ["sparsity=nan"], id="sparsity-nan"),
    pytest.param(_flag("--model", "nosuchnet"), ["nosuchnet", "lenet5"], id="unknown-model"),
    pytest.param(_flag("--criterion", "nosuch"), ["nosuch"], id="unknown-criterion"),
    pytest.param(_empty_data, ["dataset-fashion-mnist", "--data"], id="empty-data"),
    pytest.param(
        _truncated("train-images-idx3-ubyte.gz"),
        ["train-images-idx3-ubyte.gz", "corrupt", "--data"],
        id="truncated-gz-train-images",
    ),
    pytest.param(
        _truncated("t10k-images-idx3-ubyte"),
        ["t10k-images-idx3-ubyte", "truncated", "--data"],
        id="truncated-test-images",
    ),
    pytest.param(_garbage_baseline, ["garbage.json", "manifest missing"], id="garbage-baseline"),
    pytest.param(
        _garbage_baseline_with_manifest,
        ["ckpt.safetensors", "corrupt"],
        id="garbage-baseline-with-manifest",
    ),
    pytest.param(_missing_baseline, ["nope.safetensors"], id="missing-baseline"),
    pytest.param(
        _baseline_for_other_images, ["image_size=32", "image_size=28"], id="baseline-wrong-data"
    ),
    pytest.param(_out_under_file, ["cannot write", "--out"], id="out-under-file"),
    pytest.param(_recipe("compress: [unclosed\n  : :\n"), ["not valid YAML"], id="yaml-invalid"),
    pytest.param(
        _recipe("compress:\n  sparsity: 0.5\n  bogus: 1\n"), ["bogus"], id="yaml-unknown-key"
    ),
    pytest.param(_recipe("- sparsity\n- 0.5\n"), ["must be a mapping"], id="yaml-list"),
    pytest.param(_missing_recipe, ["nope.yaml"], id="missing-recipe"),
    pytest.param(_flag("--latency-runs", "5"), ["latency_runs=5"], id="latency-runs-5"),
    pytest.param(_flag("--limit", "3"), ["limit=3"], id="limit-too-small"),
    pytest.param(_flag("--device", "tpu"), ["tpu"], id="unknown-device"),
    pytest.param(
        _flag("--method", "structured", "--ratio", "1.0"), ["ratio=1.0", "[0, 1)"], id="ratio-1"
    ),
    pytest.param(_flag("--method", "structured", "--ratio", "nan"), ["ratio=nan"], id="ratio-nan"),
    pytest.param(
        _flag("--method", "structured", "--round-to", "0"), ["round_to=0"], id="round-to-0"
    ),
    pytest.param(
        _flag("--method", "structured", "--sparsity", "0.5"),
        ["--sparsity applies to --method unstructured or sparsegpt only", "--method unstructured"],
        id="sparsity-with-structured",
    ),
    pytest.param(
        _flag("--method", "sparsegpt", "--scope", "layer"),
        ["--scope applies to --method unstructured or structured only"],
        id="scope-with-sparsegpt",
    ),
    pytest.param(
        _flag("--dense-targets"),
        ["--dense-targets applies to --method sparsegpt only"],
        id="dense-targets-with-unstructured",
    ),
    pytest.param(
        _flag("--method", "structured", "--nm", "2:4"),
        ["--nm applies to --method unstructured or sparsegpt only"],
        id="nm-with-structured",
    ),
    pytest.param(
        _flag("--nm", "2-4"),
        ["nm='2-4'", "2:4"],
        id="nm-malformed",
    ),
    pytest.param(
        _flag("--method", "structured", "--prune-schedule", "gradual"),
        ["gradual works with method unstructured only"],
        id="gradual-with-structured",
    ),
    pytest.param(
        _flag("--recovery", "distill", "--alpha", "2"),
        ["alpha=2"],
        id="alpha-out-of-range",
    ),
    pytest.param(
        _flag("--ratio", "0.3"),
        ["--ratio applies to --method structured only", "--method structured"],
        id="ratio-with-unstructured",
    ),
    pytest.param(
        _flag("--method", "unstructured", "--reconstruct"),
        ["--reconstruct applies to --method structured only"],
        id="reconstruct-with-unstructured",
    ),
    pytest.param(
        _flag("--method", "unstructured", "--round-to", "8"),
        ["--round-to applies to --method structured only"],
        id="round-to-with-unstructured",
    ),
    pytest.param(
        _recipe("compress:\n  method: pruned\n"),
        ["method='pruned'", "unstructured, structured, sparsegpt"],
        id="yaml-unknown-method",
    ),
    pytest.param(
        _recipe("compress:\n  method: structured\n  round_to: 2.5\n"),
        ["round_to=2.5"],
        id="yaml-round-to-float",
    ),
    pytest.param(
        _recipe("compress:\n  method: structured\n  sparsity: 0.5\n"),
        ["'sparsity'", "method unstructured or sparsegpt only", "set method: unstructured"],
        id="yaml-sparsity-with-structured",
    ),
    pytest.param(
        _recipe("compress:\n  ratio: 0.5\n"),
        ["'ratio'", "method structured only", "set method: structured"],
        id="yaml-ratio-with-unstructured",
    ),
    pytest.param(
        _recipe_and_flags("compress:\n  sparsity: 0.5\n", "--method", "structured"),
        ["'sparsity'", "drop --method structured"],
        id="yaml-sparsity-with-method-flag",
    ),
    pytest.param(
        _flag("--device", "cuda"),
        ["CUDA is not available"],
        id="cuda-without-cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
    ),
]


@pytest.mark.parametrize(("case", "fragments"), BAD_INPUT)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    digits_idx_dir: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    case: Case,
    fragments: list[str],
) -> None:
    argv, out = case(tmp_path, digits_idx_dir)
    before = {p for p in tmp_path.rglob("*")}

    assert main(argv) == 2

    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err
    assert err.startswith("secateur: error:")
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in err
    # Nothing written: --out is absent or empty, and no new file appeared anywhere.
    assert not out.exists() or list(out.iterdir()) == []
    new_files = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new_files == set()
    assert not cache_dir.exists()


@pytest.mark.parametrize("text", ["compress: [1, 2]\n", "- 1\n"], ids=["list-section", "list"])
def test_recipe_whose_compress_section_is_not_a_mapping(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    assert main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secateur: error:") and "\n" not in err


def test_argparse_type_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compress", "--sparsity", "lots"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid float value: 'lots'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--method", "pruned"], "invalid choice: 'pruned'"),
        (["--ratio", "half"], "invalid float value: 'half'"),
        (["--round-to", "2.5"], "invalid int value: '2.5'"),
    ],
    ids=["method", "ratio", "round-to"],
)
def test_argparse_rejects_bad_structured_flags(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compress", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: secateur")
    assert "compress" in captured.out
    assert captured.err == ""


def test_console_script_bad_sparsity(tmp_path: Path) -> None:
    env = {**os.environ, "SECATEUR_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "secateur", "compress", "--sparsity", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err
    assert err.startswith("secateur: error:")
    assert "sparsity=2.0" in err
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "described", "sparsity"),
    [
        (("--criterion", "taylor", "--sparsity", "0.8"), "unstructured taylor, global", 0.8),
        (("--criterion", "wanda", "--nm", "2:4"), "pattern 2:4", 0.5),
        (("--method", "sparsegpt", "--sparsity", "0.6"), "SparseGPT reconstruction", 0.6),
        (
            ("--method", "sparsegpt", "--sparsity", "0.6", "--dense-targets"),
            "SparseGPT reconstruction of the dense model's layer outputs",
            0.6,
        ),
        (("--prune-schedule", "iterative", "--prune-steps", "2"), "iterative (2 prune", 0.85),
        (
            (
                "--prune-schedule",
                "gradual",
            ),
            "cubic AGP",
            0.85,
        ),
        (("--recovery", "distill", "--temperature", "2"), "distill from the baseline (T=2.0", 0.85),
    ],
    ids=["taylor", "wanda-2:4", "sparsegpt", "sparsegpt-dense", "iterative", "gradual", "distill"],
)
def test_compress_criteria_schedules_and_recovery(
    digits_idx_dir: Path, tmp_path: Path, flags: tuple[str, ...], described: str, sparsity: float
) -> None:
    out = tmp_path / "out"
    argv = _base(digits_idx_dir, out, "--finetune-epochs", "2", "--limit", "300", *flags)
    assert main(argv) == 0
    loaded = load_model(out / "pruned.safetensors")
    weights = [p for n, p in loaded.model.named_parameters() if n.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(sparsity, abs=0.01)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert described in _report_row(report, "pruning")[1]


def test_compress_structured_with_a_data_criterion_and_global_scope(
    digits_idx_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = _base(
        digits_idx_dir,
        out,
        "--method",
        "structured",
        "--criterion",
        "taylor",
        "--scope",
        "global",
        "--ratio",
        "0.5",
        "--limit",
        "300",
    )
    assert main(argv) == 0
    model = load_model(out / "pruned.safetensors").model
    assert model.fc1.out_features + model.fc2.out_features == 200
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "taylor criterion, global scope" in _report_row(report, "pruning")[1]
