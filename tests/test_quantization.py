"""int8 post-training quantization: ONNX Runtime dynamic/static, PyTorch dynamic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from secateur import StructuredConfig, create_model, prune_
from secateur.data import DataSplits, load_fashion_mnist, write_idx
from secateur.errors import ArtifactError, ConfigError
from secateur.export import export_onnx
from secateur.measure import OnnxRunner
from secateur.quantization import QuantMode, quantize_dynamic_torch, quantize_onnx
from secateur.quantization._onnx_int8 import cpu_needs_reduce_range
from secateur.training import TrainConfig, evaluate, fit

pytest.importorskip("onnxruntime")

AGREEMENT = 0.9  # int8 vs fp32 argmax agreement on the 297 test digits
REL_ERROR = 0.1  # ||int8 logits - fp32 logits|| / ||fp32 logits||


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DataSplits:
    """sklearn's digits as 28×28 IDX files, as tests/conftest.py::digits_idx_dir makes them."""
    folder = tmp_path_factory.mktemp("digits-idx")
    raw = load_digits()
    small = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.pad(np.kron(small, np.ones((1, 3, 3), dtype=np.uint8)), ((0, 0), (2, 2), (2, 2)))
    labels = raw.target.astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte", images[:1500])
    write_idx(folder / "train-labels-idx1-ubyte", labels[:1500])
    write_idx(folder / "t10k-images-idx3-ubyte", images[1500:])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[1500:])
    return load_fashion_mnist(folder)


@pytest.fixture(scope="module")
def trained(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """lenet_300_100 trained one epoch on the digits (~86% test top-1), and its fp32 ONNX."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    fit(model, digits, TrainConfig(epochs=1, batch_size=64, lr=0.05), progress=False)
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "fp32.onnx"
    return model, export_onnx(model, digits.example_input, path).path


def _logits(model, digits: DataSplits) -> torch.Tensor:
    with torch.no_grad():
        return model(digits.test.images)


@pytest.mark.parametrize("mode", list(QuantMode))
def test_int8_onnx_agrees_with_fp32_and_is_smaller(
    tmp_path, digits: DataSplits, trained, mode: QuantMode
) -> None:
    model, fp32 = trained
    calibration = digits.train if mode is QuantMode.STATIC else None
    out = quantize_onnx(fp32, tmp_path / "int8.onnx", mode=mode, calibration=calibration)
    assert out == tmp_path / "int8.onnx"
    assert out.stat().st_size / fp32.stat().st_size < 0.4  # measured 0.26 for both modes
    runner = OnnxRunner(out, threads=1)
    expected, got = _logits(model, digits), _logits(runner, digits)
    agreement = float((expected.argmax(1) == got.argmax(1)).float().mean())
    assert agreement >= AGREEMENT
    assert float((got - expected).norm() / expected.norm()) < REL_ERROR
    fp32_top1 = evaluate(model, digits.test)
    assert fp32_top1 > 0.8  # the check means something only for a model that learned
    assert evaluate(runner, digits.test) >= fp32_top1 - 0.03
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no temp files left


def test_static_calibration_forms_and_conv_models(tmp_path, digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    fp32 = export_onnx(model, digits.example_input, tmp_path / "lenet5.onnx").path
    x = digits.train.images[:64]
    forms = {
        "pairs": [(x[:32], digits.train.labels[:32]), (x[32:], digits.train.labels[32:])],
        "tensors": [x[:32], x[32:]],
        "dicts": [{"input": x}],
    }
    with torch.no_grad():
        expected = model(digits.test.images)
    for name, calibration in forms.items():
        out = quantize_onnx(fp32, tmp_path / f"{name}.onnx", mode="static", calibration=calibration)
        got = OnnxRunner(out)(digits.test.images)
        assert got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) < REL_ERROR, name
    assert quantize_onnx(fp32, tmp_path / "dyn.onnx", per_channel=False).is_file()


def test_bad_quantization_requests(tmp_path, trained) -> None:
    _, fp32 = trained
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_onnx(fp32, tmp_path / "q.onnx", mode=QuantMode.STATIC)
    with pytest.raises(ConfigError, match="no batch"):
        quantize_onnx(fp32, tmp_path / "q.onnx", mode="static", calibration=[])
    with pytest.raises(ConfigError, match=r"must end in \.onnx"):
        quantize_onnx(fp32, tmp_path / "q.int8")
    with pytest.raises(ConfigError, match="mode='fp8' is unknown"):
        quantize_onnx(fp32, tmp_path / "q.onnx", mode="fp8")
    with pytest.raises(ConfigError, match="not an input of the ONNX graph"):
        quantize_onnx(fp32, tmp_path / "q.onnx", mode="static", calibration=[{"x": torch.ones(1)}])
    with pytest.raises(ArtifactError, match="no ONNX file"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(fp32.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        quantize_onnx(corrupt, tmp_path / "q.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.onnx"]


def test_torch_dynamic_int8_is_a_close_cpu_copy(digits: DataSplits, trained) -> None:
    model, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_dynamic_torch(model)
    assert quantized is not model
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in quantized.modules()) == 3
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    expected, got = _logits(model, digits), _logits(quantized, digits)
    assert float((expected.argmax(1) == got.argmax(1)).float().mean()) >= AGREEMENT
    assert float((got - expected).norm() / expected.norm()) < REL_ERROR
    with pytest.raises(ConfigError, match="no nn.Linear"):
        quantize_dynamic_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_prune_finetune_quantize_composes(tmp_path, digits: DataSplits) -> None:
    """Structurally pruned and fine-tuned, then int8: the narrower graph quantizes and runs."""
    torch.manual_seed(0)
    model = create_model("lenet5")
    fit(model, digits, TrainConfig(epochs=1, batch_size=64, lr=0.05), progress=False)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=digits.example_input)
    fit(model, digits, TrainConfig(epochs=1, batch_size=64, lr=0.01), progress=False)
    model.eval()
    fp32 = export_onnx(model, digits.example_input, tmp_path / "pruned.onnx").path
    dense = export_onnx(create_model("lenet5"), digits.example_input, tmp_path / "dense.onnx").path
    assert fp32.stat().st_size < 0.5 * dense.stat().st_size  # the channels are really gone
    out = quantize_onnx(
        fp32, tmp_path / "pruned.int8.onnx", mode="static", calibration=digits.train
    )
    runner = OnnxRunner(out)
    expected, got = _logits(model, digits), _logits(runner, digits)
    assert float((expected.argmax(1) == got.argmax(1)).float().mean()) >= AGREEMENT
    assert evaluate(runner, digits.test) >= evaluate(model, digits.test) - 0.03


def test_pre_processing_runs_on_a_relative_path(tmp_path, monkeypatch) -> None:
    """ONNX Runtime's pre-processing runs from a temporary folder (it may drop files in the
    working directory): a path relative to the caller's directory must still reach it."""
    from secateur.quantization._onnx_int8 import _modules, _pre_process

    export_onnx(create_model("lenet5"), torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "work"
    folder.mkdir()
    prepared = _pre_process(_modules()[1], Path("m.onnx"), folder)
    assert prepared == (folder / "pre.onnx").resolve() and prepared.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "work"]


@pytest.mark.parametrize(
    ("machine", "flags", "needed"),
    [
        ("x86_64", "fpu sse avx2 fma", True),  # AVX2 only: u8s8 sums saturate
        ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
        ("x86_64", "fpu avx2 avx_vnni", False),
        ("aarch64", "fp asimd asimddp", False),
    ],
)
def test_weights_keep_to_7_bits_only_on_x86_without_vnni(
    monkeypatch, machine: str, flags: str, needed: bool
) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    cpuinfo = f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n"
    assert cpu_needs_reduce_range(cpuinfo) is needed


def test_reduce_range_stores_7_bit_weights(tmp_path, trained) -> None:  # noqa: ANN001
    import onnx
    from onnx import numpy_helper

    _, fp32 = trained
    widest = {}
    for reduce in (False, True):
        out = quantize_onnx(fp32, tmp_path / f"q{reduce}.onnx", reduce_range=reduce)
        weights = [
            numpy_helper.to_array(t).astype(np.int32)
            for t in onnx.load(str(out)).graph.initializer
            if t.name.endswith("_quantized")
        ]
        assert weights
        widest[reduce] = max(int(np.abs(w).max()) for w in weights)
    assert widest[False] > 64 and widest[True] <= 64
