"""``secateur export``: the three formats end to end, reports, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secateur import UnstructuredConfig, create_model, load_model, prune_, save_model
from secateur.cli._main import main
from secateur.data import load_fashion_mnist
from secateur.export import load_compressed
from secateur.measure import OnnxRunner
from secateur.training import TrainConfig, fit

FAST = ["--latency-runs", "20", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, digits_idx_shared: Path
) -> tuple[Path, Path]:
    """A LeNet-300-100 trained briefly on the digits IDX folder, pruned to 90%, saved."""
    folder = tmp_path_factory.mktemp("export")
    data_dir = digits_idx_shared
    data = load_fashion_mnist(data_dir)
    torch.manual_seed(0)
    net = create_model("lenet_300_100", in_channels=1, num_classes=10, image_size=28)
    fit(net, data, TrainConfig(epochs=3), progress=False)
    prune_(net, UnstructuredConfig(sparsity=0.9))
    return save_model(net, folder / "pruned.safetensors"), data_dir


def _run(checkpoint: tuple[Path, Path], out: Path, *extra: str) -> int:
    path, data = checkpoint
    return main(["export", str(path), "--data", str(data), "--out", str(out), *FAST, *extra])


def test_compressed_exact_is_bit_identical_and_reports_stages(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.secz"
    assert _run(checkpoint, out, "--values", "exact") == 0
    original = load_model(checkpoint[0]).model.state_dict()
    restored = load_compressed(out).model.state_dict()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    report = (tmp_path / "m.secz.md").read_text()
    assert "Bytes on disk, stage by stage" in report
    assert "every tensor equal" in report
    assert f"{out.stat().st_size:,}" in report  # the file's measured size is what is reported


def test_codebook_with_centroid_fine_tuning(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.secz"
    assert _run(checkpoint, out, "--bits", "3", "--finetune-epochs", "1") == 0
    model = load_compressed(out).model
    for name, param in model.named_parameters():
        if param.dim() == 2:
            assert param[param != 0].unique().numel() <= 8, name
    report = (tmp_path / "m.secz.md").read_text()
    assert "centroids fine-tuned for 1 epoch" in report
    assert "3-bit codebooks" in report


def test_onnx_fp32_and_int8_side_by_side(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.int8.onnx"
    assert _run(checkpoint, out, "--format", "onnx-int8", "--calibration-batches", "2") == 0
    fp32 = tmp_path / "m.onnx"
    assert fp32.exists() and out.stat().st_size < 0.4 * fp32.stat().st_size
    assert OnnxRunner(out)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    report = (tmp_path / "m.int8.onnx.md").read_text()
    for label in (
        "checkpoint (fp32)",
        "ONNX fp32",
        "ONNX int8 static",
        "PyTorch int8 dynamic (Linear layers)",
    ):
        assert f"| {label} |" in report
    assert "onnxruntime" in report


def test_onnx_default_path_is_beside_the_checkpoint(checkpoint, tmp_path: Path) -> None:
    source = tmp_path / "net.safetensors"
    net = load_model(checkpoint[0]).model
    save_model(net, source)
    assert (
        main(["export", str(source), "--data", str(checkpoint[1]), "--format", "onnx", *FAST]) == 0
    )
    assert (tmp_path / "net.onnx").exists() and (tmp_path / "net.onnx.md").exists()


def test_recipe_section_and_flag_override(checkpoint, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("export:\n  values: int8\n  entropy: none\n")
    out = tmp_path / "m.secz"
    assert _run(checkpoint, out, "--recipe", str(recipe), "--entropy", "zstd") == 0
    report = (tmp_path / "m.secz.md").read_text()
    assert "+ int8 values" in report and "+ zstd" in report


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export"], "checkpoint is required"),
        (["export", "model.pt"], "not a .safetensors file"),
        (["export", "x.safetensors", "--format", "onnx", "--bits", "4"], "--bits applies to"),
        (["export", "x.safetensors", "--quantize", "dynamic"], "--quantize applies to"),
        (["export", "x.safetensors", "--per-tensor"], "--per-tensor applies to"),
        (["export", "x.safetensors", "--format", "onnx", "--layer-bits", "f*=8"], "--layer-bits"),
        (["export", "x.safetensors", "--out", "m.onnx"], "does not end in .secz"),
        (["export", "x.safetensors", "--bits", "12"], "bits=12"),
        (["export", "x.safetensors", "--layer-bits", "fc1"], "PATTERN=BITS"),
        (["export", "x.safetensors", "--latency-runs", "3"], "latency_runs"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message: str, capsys, tmp_path: Path) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_or_corrupt_checkpoint_leaves_nothing(checkpoint, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(checkpoint[0].read_bytes()[:100])
    bad.with_suffix(".json").write_text(checkpoint[0].with_suffix(".json").read_text())
    for source in (tmp_path / "none.safetensors", bad):
        code = main(["export", str(source), "--data", str(checkpoint[1]), *FAST])
        assert code == 2
        assert "secateur: error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "bad.safetensors"]
