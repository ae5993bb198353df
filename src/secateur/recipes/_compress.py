"""The ``compress`` job: data → baseline → prune → fine-tune → measure → save → report.

It only wires the stages together; each figure it reports comes from ``measure``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text, ensure_writable_dir
from ..data import DataSplits, load_fashion_mnist
from ..errors import ArtifactError
from ..export import load_model, save_model, update_metadata
from ..measure import Metrics, measure, measure_latencies
from ..pruning import prune_
from ..recovery import finetune
from ..report import comparison_table, conditions, markdown_report
from ..training import fit, resolve_device
from ..zoo import create_model
from ._compress_config import CompressConfig

DISK_NOTE = (
    "The weights file is dense safetensors: a zero takes as many bytes as any other value, so "
    "pruning alone does not make this file smaller. secateur does not write a compressed sparse "
    "format yet."
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


def run_compress(config: CompressConfig, *, console: Console | None = None) -> CompressResult:
    """Run the compress job described by ``config`` and return both measurements and paths.

    Raises:
        SecateurError: subclasses, one line each, for bad data, checkpoints or output folders;
        nothing half-written is left in ``config.out``.
    """
    console = console or Console()
    out = ensure_writable_dir(config.out)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = load_fashion_mnist(config.data, seed=config.seed, limit=config.limit)
    console.print(
        f"data: {data.source}: {len(data.train):,} train / {len(data.val):,} val / "
        f"{len(data.test):,} test images; device {device}, {torch.get_num_threads()} threads"
    )

    baseline, source = _baseline(config, data, device, console)
    console.print(f"baseline {config.model}: {source}")
    meta = {"data": _data_metadata(data), "recipe": config.to_dict()}
    baseline_path = save_model(baseline, out / "baseline.safetensors", metadata=meta)
    before = _measure_saved(baseline, baseline_path, data, device, config.progress)

    pruned = copy.deepcopy(baseline)
    masks = prune_(pruned, config.pruning(), example_inputs=data.example_input.to(device))
    console.print(f"pruned {len(masks.masks)} layers to {masks.sparsity():.1%} of their weights")
    finetune(pruned, data, config.finetuning(), masks, progress=config.progress)
    masks.make_permanent()
    pruned_path = save_model(
        pruned, out / "pruned.safetensors", metadata={**meta, "pruning": config.pruning().to_dict()}
    )
    after = _measure_saved(pruned, pruned_path, data, device, config.progress)
    lat_before, lat_after = measure_latencies(
        [baseline, pruned],
        data.example_input.to(device),
        runs=config.latency_runs,
        progress=config.progress,
    )
    before, after = before.replace(latency=lat_before), after.replace(latency=lat_after)
    update_metadata(pruned_path, {"metrics": after.to_dict()})
    update_metadata(baseline_path, {"metrics": before.to_dict()})

    console.print(comparison_table(before, after))
    for line in conditions(after):
        console.print(f"  {line}")
    console.print(f"  {DISK_NOTE}")
    report_path = out / "report.md"
    setup = [
        ("model", config.model),
        ("data", f"{data.source} ({len(data.train):,} train, {len(data.test):,} test)"),
        ("baseline", source),
        (
            "pruning",
            f"unstructured {config.criterion}, {config.scope.value} scope, sparsity {config.sparsity}",
        ),
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
            notes=[DISK_NOTE, LATENCY_NOTE],
        ),
    )
    console.print(f"saved {pruned_path}, {baseline_path} and {report_path}")
    return CompressResult(before, after, baseline_path, pruned_path, report_path, source)
