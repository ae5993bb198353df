"""The ``export`` job: checkpoint → ONNX, int8 ONNX or compressed file → measure side by side.

Every variant's accuracy is measured on the test split on its own runtime, and every variant
is timed in one interleaved loop, so ratios are fair on a noisy machine. Exports run on CPU,
where the ONNX Runtime and PyTorch int8 kernels run; ``device`` is used for centroid
fine-tuning only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text, ensure_writable_dir
from ..data import DataSplits, load_fashion_mnist
from ..errors import ConfigError
from ..export import compression_stages, export_onnx, load_compressed, load_model, save_compressed
from ..measure import Accuracy, OnnxRunner, measure_latencies
from ..quantization import CodebookConfig, cluster_weights_, quantize_dynamic_torch, quantize_onnx
from ..report import VariantFigures, export_markdown, export_table, stages_table
from ..training import TrainConfig, evaluate, fit, resolve_device
from ._compress import _calibration, _check_fits_data
from ._export_config import ExportConfig, ExportFormat

PYTORCH = f"PyTorch {torch.__version__} eager"
#: Config fields whose CLI flag is not the field's name with dashes.
FLAGS = {"per_channel": "--per-tensor", "per_layer_bits": "--layer-bits"}


@dataclass(frozen=True)
class ExportResult:
    artifact: Path
    report: Path
    variants: tuple[VariantFigures, ...]
    stages: tuple[tuple[str, int], ...]


def _accuracy(model: Any, data: DataSplits, progress: bool, what: str) -> Accuracy:
    top1 = evaluate(model, data.test, progress=progress, description=f"evaluate {what}")
    return Accuracy(top1=top1, samples=len(data.test), split="test")


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def _trained_codebooks(
    model: nn.Module, config: ExportConfig, data: DataSplits, console: Console
) -> tuple[nn.Module, list[str]]:
    """Cluster a copy of ``model`` and fine-tune its centroids; return it and report notes."""
    device = resolve_device(config.device)
    clustered = copy.deepcopy(model).to(device)
    books = cluster_weights_(
        clustered, CodebookConfig(bits=config.bits, per_layer=config.per_layer_bits)
    )
    before = evaluate(clustered, data.test)
    train = TrainConfig(
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    fit(
        clustered,
        data,
        train,
        constraint=books,
        description="fine-tune centroids",
        progress=config.progress,
    )
    after = evaluate(clustered, data.test)
    console.print(
        f"codebooks: test top-1 {before:.2%} right after k-means, {after:.2%} after "
        f"{config.finetune_epochs} epoch(s) of centroid fine-tuning"
    )
    note = (
        f"Weights were clustered by k-means (test top-1 {before:.2%}) and the centroids "
        f"fine-tuned for {config.finetune_epochs} epoch(s) at lr {config.finetune_lr} "
        f"({after:.2%})."
    )
    return clustered.cpu().eval(), [note]


def _compressed(
    model: nn.Module, config: ExportConfig, data: DataSplits, path: Path, console: Console
) -> tuple[list[VariantFigures], list[tuple[str, int]], list[str], list[nn.Module]]:
    compression = config.compression()
    notes: list[str] = []
    source = model
    if compression.values.value == "codebook" and config.finetune_epochs > 0:
        source, notes = _trained_codebooks(model, config, data, console)
    metadata = {"source": config.checkpoint}
    stages = [(s.name, s.bytes) for s in compression_stages(source, compression, metadata=metadata)]
    save_compressed(source, path, compression, metadata=metadata)
    restored = load_compressed(path).model
    exact = _same_state(source, restored)
    if compression.values.value == "exact":
        notes.append(
            "Values are stored exactly: the restored model is bit-identical to the checkpoint "
            f"({'checked: every tensor equal' if exact else 'CHECK FAILED'})."
        )
    elif exact:
        notes.append("The restored model is bit-identical to the fine-tuned clustered model.")
    else:
        notes.append(
            f"Values are quantized ({compression.values.value}): the restored weights differ "
            "from the checkpoint by the quantization error; every zero stays zero, and a tiny "
            "weight may round to zero."
        )
    row = VariantFigures(
        f"compressed ({compression.values.value})",
        PYTORCH,
        str(path),
        path.stat().st_size,
        _accuracy(restored, data, config.progress, "restored model"),
        None,
    )
    return [row], stages, notes, [restored]


def _onnx(
    model: nn.Module, config: ExportConfig, data: DataSplits, path: Path
) -> tuple[list[VariantFigures], list[str], list[Any]]:
    example = data.example_input
    int8 = config.format is ExportFormat.ONNX_INT8
    fp32_path = path.with_name(path.name.removesuffix(".int8.onnx") + ".onnx") if int8 else path
    exported = export_onnx(model, example, fp32_path, opset=config.opset)
    runners: list[Any] = [OnnxRunner(fp32_path)]
    labels = ["ONNX fp32"]
    notes = [
        f"ONNX opset {exported.opset}; ONNX Runtime's outputs match PyTorch's on the example "
        f"input, on it flipped and on twice its batch within |diff| <= "
        f"{exported.max_abs_diff:.2e}."
    ]
    if int8:
        quantize_onnx(
            fp32_path,
            path,
            mode=config.quantize,
            calibration=_calibration(config, data, torch.device("cpu"))
            if config.quantize.value == "static"
            else None,
            per_channel=config.per_channel,
        )
        runners.append(OnnxRunner(path))
        labels.append(f"ONNX int8 {config.quantize.value}")
        notes.append(
            f"int8 by ONNX Runtime's {config.quantize.value} quantization (QDQ, "
            f"{'per-channel' if config.per_channel else 'per-tensor'} weights"
            + (
                f", activation ranges from {config.calibration_batches} training batches)"
                if config.quantize.value == "static"
                else ", activations quantized per batch at run time)"
            )
        )
    rows = [
        VariantFigures(
            label,
            runner.runtime,
            str(runner.path),
            runner.path.stat().st_size,
            _accuracy(runner, data, config.progress, label),
            None,
        )
        for label, runner in zip(labels, runners, strict=True)
    ]
    if int8 and any(isinstance(m, nn.Linear) for m in model.modules()):
        qmodel = quantize_dynamic_torch(model)
        rows.append(
            VariantFigures(
                "PyTorch int8 dynamic (Linear layers)",
                PYTORCH,
                None,
                None,
                _accuracy(qmodel, data, config.progress, "PyTorch int8"),
                None,
            )
        )
        runners.append(qmodel)
        notes.append(
            "PyTorch's dynamic int8 path quantizes Linear layers only (convolutions stay fp32) "
            "and is not written to disk; it is shown for comparison on the same machine."
        )
    return rows, notes, runners


def run_export(config: ExportConfig, *, console: Console | None = None) -> ExportResult:
    """Run the export job described by ``config``; write the artifact and its report.

    Raises:
        SecateurError: subclasses, one line each, for a bad checkpoint, data or output folder;
        files are written atomically, so nothing half-written is left behind.
    """
    console = console or Console()
    path = config.artifact_path()
    ensure_writable_dir(path.parent)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    loaded = load_model(config.checkpoint)
    model = loaded.model
    data = load_fashion_mnist(config.data, seed=config.seed, limit=config.limit)
    _check_fits_data(model, config.checkpoint, data)
    console.print(
        f"checkpoint {config.checkpoint}; test split: {len(data.test):,} images of {data.source}; "
        f"{torch.get_num_threads()} threads"
    )
    checkpoint_size = Path(config.checkpoint).stat().st_size
    base = VariantFigures(
        "checkpoint (fp32)",
        PYTORCH,
        config.checkpoint,
        checkpoint_size,
        _accuracy(model, data, config.progress, "checkpoint"),
        None,
    )
    stages: list[tuple[str, int]] = []
    if config.format is ExportFormat.COMPRESSED:
        rows, stages, notes, timed = _compressed(model, config, data, path, console)
    else:
        rows, notes, timed = _onnx(model, config, data, path)
    latencies = measure_latencies(
        [model, *timed],
        data.test.images[: config.latency_batch],
        runs=config.latency_runs,
        progress=config.progress,
    )
    variants = [base, *rows]
    variants = [
        VariantFigures(v.label, v.runtime, v.file, v.bytes, v.accuracy, lat)
        for v, lat in zip(variants, latencies, strict=True)
    ]
    if config.format is ExportFormat.COMPRESSED:
        notes.append(
            "The compressed file is for storage and transfer: loading decodes it back to dense "
            "tensors, so the restored model runs at dense speed."
        )
    console.print(export_table(variants, title=f"secateur export --format {config.format.value}"))
    if stages:
        console.print(stages_table(stages))
    for note in notes:
        console.print(f"  {note}")
    report = path.with_name(path.name + ".md")
    setup = [
        ("checkpoint", config.checkpoint),
        ("format", config.format.value),
        ("artifact", str(path)),
        ("data", f"{data.source} ({len(data.test):,} test images)"),
        ("machine", f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    atomic_write_text(
        report,
        export_markdown(
            variants,
            title=f"secateur export: {Path(config.checkpoint).name}",
            setup=setup,
            stages=stages,
            notes=notes,
        ),
    )
    console.print(f"saved {path} and {report}")
    return ExportResult(path, report, tuple(variants), tuple(stages))


def check_format_settings(
    fmt: ExportFormat, given: dict[str, Any], table: dict[str, tuple[ExportFormat, ...]]
) -> None:
    """Reject a setting given for a format that does not read it, rather than ignore it."""
    for key, formats in table.items():
        if key in given and fmt not in formats:
            users = " or ".join(f.value for f in formats)
            flag = FLAGS.get(key, "--" + key.replace("_", "-"))
            raise ConfigError(
                f"{flag} applies to --format {users} only: drop it, or pass --format "
                f"{formats[0].value}"
            )
