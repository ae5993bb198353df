"""The ``compress`` job: data → baseline → prune → fine-tune → measure → save → report.

It only wires the stages together; each figure it reports comes from ``measure``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text, ensure_writable_dir
from ..data import DataSplits, load_fashion_mnist
from ..errors import ArtifactError, ConfigError
from ..export import (
    CompressionConfig,
    export_onnx,
    load_model,
    save_compressed,
    save_model,
    update_metadata,
)
from ..measure import Metrics, OnnxRunner, measure, measure_latencies
from ..pruning import (
    DepthResult,
    GradualPruner,
    MaskSet,
    PruneSchedule,
    ScheduleConfig,
    StructuredResult,
    prune_,
    prune_iteratively_,
)
from ..recovery import batchnorm_layers, distill, finetune, recalibrate_batchnorm_
from ..report import comparison_table, conditions, markdown_report
from ..training import TrainConfig, fit, resolve_device
from ..zoo import create_model
from ._compress_config import CompressConfig, CompressMethod, Recovery

DISK_NOTE = (
    "The weights file is dense safetensors: a zero takes as many bytes as any other value, so "
    "pruning alone does not make that file smaller."
)


def _compressed_note(path: Path, baseline_bytes: int | None) -> str:
    """What the lossless compressed copy of the pruned model measures on disk."""
    size = path.stat().st_size
    versus = f", {baseline_bytes / size:.1f}× smaller than the baseline's" if baseline_bytes else ""
    return (
        f"{path.name} holds the same pruned model losslessly (sparse index + exact values + zstd; "
        f"it reloads bit-identical with secateur.export.load_compressed): {size:,} B on disk"
        f"{versus} weights file. 'secateur export {path.with_suffix('.safetensors').name}' adds "
        "codebook or int8 values and ONNX formats, and reports each stage."
    )


LATENCY_NOTE = (
    "Unstructured zeros run through the same dense kernels, so latency is not expected to fall; "
    "both models were timed interleaved in one loop, so the ratio is fair on a noisy machine; the figures are measured, not projected."
)


@dataclass(frozen=True)
class CompressResult:
    baseline: Metrics
    pruned: Metrics
    baseline_path: Path
    pruned_path: Path
    report_path: Path
    baseline_source: str
    compressed_path: Path


def default_cache_dir() -> Path:
    """``$SECATEUR_CACHE``, else ``$XDG_CACHE_HOME/secateur``, else ``~/.cache/secateur``."""
    if os.environ.get("SECATEUR_CACHE"):
        return Path(os.environ["SECATEUR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "secateur"


def _data_fingerprint(data: DataSplits) -> dict[str, Any]:
    return {
        "source": data.source,
        "train": len(data.train),
        "val": len(data.val),
        "test": len(data.test),
        "mean": round(data.mean, 6),
        "std": round(data.std, 6),
    }


def _model_kwargs(data: DataSplits) -> dict[str, int]:
    return {
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
    }


def _data_metadata(data: DataSplits) -> dict[str, Any]:
    return {**_data_fingerprint(data), **_model_kwargs(data)}


def _check_fits_data(model: nn.Module, path: str, data: DataSplits) -> None:
    kwargs = getattr(model, "secateur_spec", {}).get("kwargs", {})
    for key, want in _model_kwargs(data).items():
        if key in kwargs and kwargs[key] != want:
            raise ArtifactError(
                f"checkpoint {path} was built for {key}={kwargs[key]} but the data has {key}={want}: "
                "pass a checkpoint trained on this dataset"
            )


def _baseline(
    config: CompressConfig, data: DataSplits, device: torch.device, console: Console
) -> tuple[nn.Module, str]:
    """Return the baseline model on ``device`` and a phrase saying where it came from."""
    if config.baseline is not None:
        loaded = load_model(config.baseline, device=str(device))
        _check_fits_data(loaded.model, config.baseline, data)
        return loaded.model, f"loaded from {config.baseline}"
    train_cfg = config.baseline_training()
    key_src = json.dumps(
        {"model": config.model, "train": train_cfg.to_dict(), "data": _data_fingerprint(data)},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cached = default_cache_dir() / f"baseline-{config.model}-{key}.safetensors"
    if config.cache and cached.exists():
        try:
            return load_model(cached, device=str(device)).model, f"reused from cache {cached}"
        except ArtifactError as exc:
            console.print(f"[yellow]ignoring unusable cached baseline: {exc}")
    model = create_model(config.model, **_model_kwargs(data)).to(device)
    fit(model, data, train_cfg, description=f"train {config.model}", progress=config.progress)
    source = f"trained here for {train_cfg.epochs} epochs"
    if config.cache:
        try:
            ensure_writable_dir(cached.parent)
            save_model(
                model, cached, metadata={"data": _data_metadata(data), "train": train_cfg.to_dict()}
            )
            source += f", cached at {cached}"
        except Exception as exc:  # a cache that cannot be written must not fail the job
            console.print(f"[yellow]could not cache the baseline: {exc}")
    return model, source


def _measure_saved(
    model: nn.Module, path: Path, data: DataSplits, device: torch.device, progress: bool
) -> Metrics:
    """Everything but latency, which is timed for both models together."""
    example = data.example_input.to(device)
    return measure(
        model, example, eval_split=data.test, saved_file=path, latency_runs=None, progress=progress
    )


def _structured_notes(
    before: Metrics, after: Metrics, *, channels: bool = True, blocks: bool = False
) -> list[str]:
    """What removing whole ``channels`` and/or residual ``blocks`` changed on disk and in
    latency, in measured figures only."""
    disk = "not measured"
    if before.disk_bytes is not None and after.disk_bytes is not None:
        disk = f"{after.disk_bytes:,} B against {before.disk_bytes:,} B for the baseline"
    if blocks and not channels:
        what = "Whole residual blocks were replaced by an identity skip, so the model is shallower"
        reloads = "with those blocks skipped"
        smaller = "The shallower model does"
    elif blocks:
        what = (
            "Whole residual blocks were replaced by an identity skip, then whole channels and "
            "neurons were removed, so the model is shallower and its layers narrower"
        )
        reloads = "with those blocks skipped and at its pruned widths"
        smaller = "The pruned model does"
    else:
        what = "Whole channels and neurons were removed, so the pruned layers are narrower"
        reloads = "at its pruned widths"
        smaller = "The narrower layers do"
    notes = [
        f"{what}: the weights file (dense safetensors, measured on disk) is {disk}, and it "
        f"reloads {reloads} with secateur's load_model."
    ]
    if before.latency is not None and after.latency is not None:
        notes.append(
            f"{smaller} {after.macs:,} MACs per sample against {before.macs:,}; "
            f"the measured median latency is {after.latency.median_ms:.3f} ms against "
            f"{before.latency.median_ms:.3f} ms under the conditions above. Both models were "
            "timed interleaved in one loop; latency need not fall in proportion to MACs, since "
            "each layer call also has fixed costs that pruning does not remove."
        )
    return notes


def _structured_summary(result: StructuredResult, before: list[int] | None = None) -> str:
    """One line: how many units went from how many groups (``before``: the original widths,
    when several rounds pruned), and what was left whole."""
    total = sum(before) if before else sum(b for b, _ in result.widths)
    removed = total - sum(after for _, after in result.widths)
    line = f"removed {removed:,} of {total:,} channels/neurons in {len(result.widths)} group(s)"
    if result.graph.blocked:
        kept = "; ".join(f"{names} ({reason})" for names, reason in result.graph.blocked)
        line += f"; left whole: {kept}"
    return line


def _prunes_depth(config: CompressConfig) -> bool:
    """Whether the job removes residual blocks (methods other than these ignore depth_ratio)."""
    return config.depth_ratio > 0 and config.method in (
        CompressMethod.DEPTH,
        CompressMethod.STRUCTURED,
    )


def _depth_summary(result: DepthResult) -> str:
    """One line: how many residual blocks went, and which."""
    return (
        f"removed {len(result.removed)} of {len(result.candidates)} residual blocks "
        f"({', '.join(result.removed)})"
    )


def _prune_depth(model: nn.Module, config: CompressConfig, example: torch.Tensor) -> DepthResult:
    """Replace ``config.depth_ratio`` of ``model``'s residual blocks by ``Skip``, in place.

    Raises:
        ConfigError: one line, when that removes no block: the model has none, ``depth_ratio``
            is too small to reach one, or every block is the last of its stage.
    """
    result = prune_(model, config.depth_pruning(), example_inputs=example)
    assert isinstance(result, DepthResult)
    if result.removed:
        return result
    name = f"checkpoint {config.baseline}" if config.baseline else f"model {config.model}"
    fix = (
        "use --method structured or unstructured"
        if config.method is CompressMethod.DEPTH
        else "drop --depth-ratio"
    )
    found = len(result.candidates)
    if not found:
        raise ConfigError(f"{name} has no residual blocks to remove: {fix}")
    if round(config.depth_ratio * found) == 0:
        least = (50 // found + 1) / 100  # the least 2-decimal ratio with round(r * found) >= 1
        raise ConfigError(
            f"--depth-ratio {config.depth_ratio} removes none of the {found} residual blocks of "
            f"{name}: pass --depth-ratio {least:g} or more"
        )
    raise ConfigError(
        f"{name} cannot lose any of its {found} residual blocks, since each is the last real "
        f"block of its stage: {fix}"
    )


def _check_depth(model: nn.Module, config: CompressConfig, data: DataSplits) -> None:
    """Fail before any training when depth pruning would remove nothing. Which blocks exist and
    how many go depends on the architecture only, so a copy of ``model`` (trained or not) is
    pruned and thrown away."""
    if _prunes_depth(config):
        example = data.example_input.to(next(model.parameters()).device)
        _prune_depth(copy.deepcopy(model), config, example)


def _calibration(config: CompressConfig, data: DataSplits, device: torch.device) -> list:
    """The first ``calibration_batches`` shuffled training batches, for data criteria."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    batches = data.train.batches(
        config.batch_size, shuffle=True, generator=generator, device=device
    )
    return [b for _, b in zip(range(config.calibration_batches), batches, strict=False)]


def _recover(
    pruned: nn.Module,
    baseline: nn.Module,
    data: DataSplits,
    config: CompressConfig,
    constraint: Any,
    epochs: int | None = None,
) -> None:
    """Fine-tune or distil ``pruned`` for ``epochs`` (default ``finetune_epochs``) while
    ``constraint`` (masks, a gradual pruner or codebooks; ``None`` for none) holds; first, with
    ``recalibrate_bn``, re-estimate its BatchNorm statistics on the calibration batches."""
    if config.recalibrate_bn and batchnorm_layers(pruned):
        device = next(pruned.parameters()).device
        recalibrate_batchnorm_(pruned, _calibration(config, data, device))
    train = config.finetuning()
    if epochs is not None:
        train = TrainConfig.from_dict({**train.to_dict(), "epochs": epochs})
    # finetune_epochs=0 means "measure the pruned model as it is"; the training loop's cosine
    # schedule cannot be built for zero steps, so the loop is not entered at all.
    if train.epochs == 0:
        return
    if config.recovery is Recovery.DISTILL:
        distill(
            pruned,
            baseline,
            data,
            train,
            config.distillation(),
            constraint,
            progress=config.progress,
        )
    else:
        finetune(pruned, data, train, constraint, progress=config.progress)


def _describe(config: CompressConfig, model: nn.Module) -> str:
    """The report's one-line account of schedule and recovery (of ``model``)."""
    schedule = config.prune_schedule.value
    if config.prune_schedule is PruneSchedule.ITERATIVE:
        schedule += f" ({config.prune_steps} prune/recover rounds)"
    if config.prune_schedule is PruneSchedule.GRADUAL:
        schedule += " (cubic AGP during fine-tuning)"
    recovery = config.recovery.value
    if config.recovery is Recovery.DISTILL:
        recovery += f" from the baseline (T={config.temperature}, alpha={config.alpha})"
    if config.recalibrate_bn and batchnorm_layers(model):
        recovery = (
            f"BatchNorm statistics re-estimated on {config.calibration_batches} calibration "
            f"batches, then {recovery}"
        )
    return f"schedule {schedule}; recovery {recovery}"


def _prune_and_finetune(
    pruned: nn.Module,
    baseline: nn.Module,
    config: CompressConfig,
    data: DataSplits,
    device: torch.device,
) -> tuple[str, str]:
    """Prune ``pruned`` in place as ``config`` says (method, schedule) and recover it.

    Returns the report's description of the pruning and a one-line summary for the console.
    """
    example = data.example_input.to(device)
    calib = _calibration(config, data, device)
    iterative = config.prune_schedule is PruneSchedule.ITERATIVE
    per_round = max(1, config.finetune_epochs // config.prune_steps)

    def recover_round(model: nn.Module, masks: MaskSet | None) -> None:
        _recover(model, baseline, data, config, masks, epochs=per_round)

    depth = ""
    if _prunes_depth(config):
        # a real batch of training images ranks the blocks by their influence on the data
        removed = _prune_depth(pruned, config, calib[0][0] if calib else example)
        depth = _depth_summary(removed)
    if config.method is CompressMethod.DEPTH:
        # No masks: the removed blocks are gone from the model, nothing can regrow them.
        _recover(pruned, baseline, data, config, None)
        described = (
            f"depth, blocks ranked by influence (1 - cosine similarity of input and output), "
            f"depth_ratio {config.depth_ratio}; {_describe(config, pruned)}; {depth}"
        )
        return described, depth
    if config.method is CompressMethod.STRUCTURED:
        cfg = config.structured_pruning()
        if iterative:
            rounds = prune_iteratively_(
                pruned,
                cfg,
                steps=config.prune_steps,
                recover=recover_round,
                example_inputs=example,
                calibration=calib,
            )
            before = [w for w, _ in rounds[0].widths]
            result = rounds[-1]
            summary = _structured_summary(result, before)
        else:
            result = prune_(pruned, cfg, example_inputs=example, calibration=calib)
            assert isinstance(result, StructuredResult)
            summary = _structured_summary(result)
            # No masks: the removed units are gone from the tensors, nothing can regrow them.
            _recover(pruned, baseline, data, config, None)
        rounding = (
            f"widths rounded down to multiples of {config.round_to}"
            if config.round_to > 1
            else "no width rounding"
        )
        if config.reconstruct:
            rounding += ", readers refitted by least squares"
        if depth:
            summary = f"{depth}, then {summary}"
            rounding += f", after depth_ratio {config.depth_ratio}"
        described = (
            f"structured, {cfg.criterion} criterion, {cfg.scope.value} scope, ratio "
            f"{config.ratio}, {rounding}; {_describe(config, pruned)}; {summary}"
        )
        return described, summary
    if config.method is CompressMethod.SPARSEGPT:
        cfg = config.sparsegpt_pruning()
        masks = prune_(pruned, cfg, calibration=calib)
        _recover(pruned, baseline, data, config, masks)
        what = f"pattern {cfg.nm}" if cfg.nm else f"sparsity {cfg.sparsity}"
        target = "of the dense model's layer outputs" if cfg.dense_targets else "layer by layer"
        described = f"SparseGPT reconstruction {target}, {what}; {_describe(config, pruned)}"
    else:
        cfg = config.unstructured_pruning()
        if iterative:
            masks = prune_iteratively_(
                pruned, cfg, steps=config.prune_steps, recover=recover_round, calibration=calib
            )[-1]
        elif config.prune_schedule is PruneSchedule.GRADUAL:
            steps = config.finetune_epochs * (len(data.train) // config.batch_size)
            start, stop = ScheduleConfig(kind="gradual").step_range(max(1, steps))
            gradual = GradualPruner(
                pruned,
                cfg,
                start_step=start,
                end_step=stop,
                frequency=max(1, (stop - start) // 20),
                calibration=calib,
            )
            _recover(pruned, baseline, data, config, gradual)
            masks = gradual.masks_
        else:
            masks = prune_(pruned, cfg, calibration=calib)
            _recover(pruned, baseline, data, config, masks)
        what = f"pattern {cfg.nm}" if cfg.nm else f"sparsity {cfg.sparsity}"
        described = f"unstructured {cfg.criterion}, {cfg.scope.value} scope, {what}; {_describe(config, pruned)}"
    assert isinstance(masks, MaskSet)
    summary = f"pruned {len(masks.masks)} layers to {masks.sparsity():.1%} of their weights"
    masks.make_permanent()
    return described, summary


def _start_job(config: Any, console: Console) -> tuple[Path, torch.device, DataSplits]:
    """What every job does first: check the output folder, pick the device and threads, load
    the data and say so. ``config`` has ``out``, ``device``, ``threads``, ``data``, ``seed``
    and ``limit``."""
    out = ensure_writable_dir(config.out)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = load_fashion_mnist(config.data, seed=config.seed, limit=config.limit)
    console.print(
        f"data: {data.source}: {len(data.train):,} train / {len(data.val):,} val / "
        f"{len(data.test):,} test images; device {device}, {torch.get_num_threads()} threads"
    )
    return out, device, data


def _onnx_runners(models: list[nn.Module], example: torch.Tensor, folder: Path) -> list[OnnxRunner]:
    """ONNX Runtime sessions of ``models``, or none: on CUDA (ONNX Runtime here runs on CPU, so
    its figure would not sit fairly beside PyTorch's) or when a model does not export."""
    if example.device.type != "cpu":
        return []
    try:
        for i, model in enumerate(models):
            export_onnx(model, example, folder / f"{i}.onnx")
        return [OnnxRunner(folder / f"{i}.onnx") for i in range(len(models))]
    except (ArtifactError, ConfigError):
        return []


def time_pair(
    first: tuple[nn.Module, Metrics],
    second: tuple[nn.Module, Metrics],
    example: torch.Tensor,
    runs: int,
    progress: bool,
) -> tuple[Metrics, Metrics]:
    """Both models' metrics with their latency, timed in one interleaved loop (so the ratio is
    fair on a noisy machine). On CPU both are also exported to ONNX (in a temporary folder) and
    their ONNX Runtime sessions timed in the same loop, into ``onnx_latency``."""
    (a, before), (b, after) = first, second
    with tempfile.TemporaryDirectory() as folder:
        runners = _onnx_runners([a, b], example, Path(folder))
        lat = measure_latencies([a, b, *runners], example, runs=runs, progress=progress)
    before, after = before.replace(latency=lat[0]), after.replace(latency=lat[1])
    if runners:
        before, after = before.replace(onnx_latency=lat[2]), after.replace(onnx_latency=lat[3])
    return before, after


def _measure_pair(
    before: Metrics,
    reference: nn.Module,
    reference_path: Path,
    model: nn.Module,
    model_path: Path,
    data: DataSplits,
    device: torch.device,
    config: Any,
) -> tuple[Metrics, Metrics]:
    """Measure the saved ``model``, time both models interleaved in one loop (so the ratio is
    fair on a noisy machine), and write each one's metrics into its manifest.

    On CPU both models are also exported to ONNX (in a temporary folder) and their ONNX Runtime
    sessions timed in the same loop, so ONNX Runtime latency sits beside PyTorch's."""
    after = _measure_saved(model, model_path, data, device, config.progress)
    example = data.example_input.to(device)
    before, after = time_pair(
        (reference, before), (model, after), example, config.latency_runs, config.progress
    )
    update_metadata(model_path, {"metrics": after.to_dict()})
    update_metadata(reference_path, {"metrics": before.to_dict()})
    return before, after


def run_compress(config: CompressConfig, *, console: Console | None = None) -> CompressResult:
    """Run the compress job described by ``config`` and return both measurements and paths.

    Raises:
        SecateurError: subclasses, one line each, for bad data, checkpoints or output folders;
        nothing half-written is left in ``config.out``.
    """
    console = console or Console()
    out, device, data = _start_job(config, console)

    if config.baseline is None:  # before training: an architecture without blocks fails fast
        _check_depth(create_model(config.model, **_model_kwargs(data)), config, data)
    baseline, source = _baseline(config, data, device, console)
    if config.baseline is not None:
        _check_depth(baseline, config, data)
    console.print(f"baseline {config.model}: {source}")
    meta = {"data": _data_metadata(data), "recipe": config.to_dict()}
    baseline_path = save_model(baseline, out / "baseline.safetensors", metadata=meta)
    before = _measure_saved(baseline, baseline_path, data, device, config.progress)

    pruned = copy.deepcopy(baseline)
    console.print(f"pruning method: {config.method.value}")
    described, summary = _prune_and_finetune(pruned, baseline, config, data, device)
    console.print(summary)
    pruning_meta = {"pruning": config.pruning().to_dict()}
    if config.method is CompressMethod.STRUCTURED and _prunes_depth(config):
        pruning_meta["depth"] = config.depth_pruning().to_dict()  # applied before the channels
    pruned_path = save_model(pruned, out / "pruned.safetensors", metadata={**meta, **pruning_meta})
    before, after = _measure_pair(
        before, baseline, baseline_path, pruned, pruned_path, data, device, config
    )
    compressed_path = save_compressed(
        pruned, out / "pruned.secz", CompressionConfig(values="exact"), metadata=meta
    )

    if config.method in (CompressMethod.STRUCTURED, CompressMethod.DEPTH):
        notes = _structured_notes(
            before,
            after,
            channels=config.method is CompressMethod.STRUCTURED,
            blocks=_prunes_depth(config),
        )
    else:
        notes = [DISK_NOTE, LATENCY_NOTE]
    notes.insert(1, _compressed_note(compressed_path, before.disk_bytes))
    console.print(comparison_table(before, after))
    for line in conditions(after):
        console.print(f"  {line}")
    for note in notes:
        console.print(f"  {note}")
    report_path = out / "report.md"
    setup = [
        ("model", config.model),
        ("data", f"{data.source} ({len(data.train):,} train, {len(data.test):,} test)"),
        ("baseline", source),
        ("method", config.method.value),
        ("pruning", described),
        (
            "fine-tuning",
            f"{config.finetune_epochs} epochs, lr {config.finetune_lr}, {config.schedule.value}",
        ),
        ("device", f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    atomic_write_text(
        report_path,
        markdown_report(
            before,
            after,
            title=f"secateur compress: {config.model}",
            setup=setup,
            notes=notes,
        ),
    )
    console.print(f"saved {pruned_path}, {compressed_path}, {baseline_path} and {report_path}")
    return CompressResult(
        before, after, baseline_path, pruned_path, report_path, source, compressed_path
    )
