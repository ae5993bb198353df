"""The ``sensitivity`` job: data → baseline (trained or cached, as ``compress`` does) → scan each
layer's sensitivity on the validation split → optional per-layer ratios for a global target,
checked by pruning a copy with them → ``sensitivity.json``, ``.png`` and ``.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text
from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from ..data import DataSplits
from ..errors import ConfigError
from ..explore import (
    DEFAULT_RATIOS,
    SensitivityMethod,
    SensitivityResult,
    allocate_ratios,
    check_ratios,
    predicted_drop,
    predicted_savings,
    sensitivity_scan,
)
from ..measure import count_macs
from ..pruning import StructuredConfig, UnstructuredConfig, prune_
from ..report import plot_sensitivity, sensitivity_markdown, sensitivity_table
from ..training import LRSchedule, evaluate
from ._compress import _baseline, _start_job
from ._compress_config import CompressConfig

SCORE_LABEL = "validation top-1 accuracy (%)"


@dataclass(frozen=True)
class SensitivityConfig:
    """Scan how much validation accuracy each layer of a trained zoo model loses when it alone
    is pruned, and optionally allocate per-layer ratios for a global target.

    The baseline is trained (or reused from the cache, or loaded from ``baseline``) exactly as
    ``compress`` does it, with ``epochs``, ``batch_size``, ``lr``, ``schedule`` and ``seed``.
    ``method``/``ratios``/``criterion`` are those of :func:`secateur.explore.sensitivity_scan`;
    ``calibration_batches`` training batches feed data criteria. ``target_sparsity``
    (unstructured: fraction of all weights) or ``target_macs`` (structured: MAC reduction
    factor, 2.0 halves them) asks for :func:`secateur.explore.allocate_ratios` with
    ``max_ratio``.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> SensitivityConfig(method="structured", target_macs=2.0).method.value
        'structured'
    """

    model: str = "lenet5"
    data: str | None = None
    method: SensitivityMethod = SensitivityMethod.UNSTRUCTURED
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    criterion: str = "magnitude"
    target_sparsity: float | None = None
    target_macs: float | None = None
    max_ratio: float = 0.95
    calibration_batches: int = 4
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    schedule: LRSchedule = LRSchedule.COSINE
    seed: int = 0
    device: str = "auto"
    out: str = "secateur-sensitivity"
    baseline: str | None = None
    cache: bool = True
    limit: int | None = None
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", coerce_enum("method", SensitivityMethod, self.method))
        object.__setattr__(self, "schedule", coerce_enum("schedule", LRSchedule, self.schedule))
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        UnstructuredConfig(sparsity=0.0, criterion=self.criterion)  # validates the criterion
        check_range("max_ratio", self.max_ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_int("calibration_batches", self.calibration_batches, 1)
        structured = self.method is SensitivityMethod.STRUCTURED
        if self.target_sparsity is not None and self.target_macs is not None:
            raise ConfigError("give target_sparsity or target_macs, not both")
        if self.target_sparsity is not None:
            check_range("target_sparsity", self.target_sparsity, 0.0, 1.0, high_open=True)
            if structured:
                raise ConfigError(
                    "target_sparsity counts zeroed weights, so it needs method unstructured: "
                    "with method structured pass target_macs (e.g. 2.0)"
                )
        if self.target_macs is not None:
            check_range("target_macs", self.target_macs, 1.0)
            if not structured:
                raise ConfigError(
                    "target_macs needs method structured (zeroed weights save no dense MACs): "
                    "pass method structured or target_sparsity"
                )
        self.baseline_config()  # validates model, epochs, batch_size, lr, limit, threads

    def baseline_config(self) -> CompressConfig:
        """The compress job's view of the baseline: same training settings, same cache key."""
        return CompressConfig(
            model=self.model,
            data=self.data,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            schedule=self.schedule,
            seed=self.seed,
            device=self.device,
            out=self.out,
            baseline=self.baseline,
            cache=self.cache,
            limit=self.limit,
            threads=self.threads,
            progress=self.progress,
        )

    @property
    def target(self) -> float | None:
        return self.target_sparsity if self.target_sparsity is not None else self.target_macs

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class AllocationCheck:
    """The baseline pruned with the allocated ratios all at once (no fine-tuning), measured.

    ``predicted_*`` come from the scan (first order); ``measured_*`` from the pruned copy:
    the fraction of scanned weights pruned (unstructured) or the dense MAC reduction
    factor (structured), and the validation score.
    """

    predicted_savings: float
    predicted_score: float
    measured_savings: float
    measured_score: float


@dataclass(frozen=True)
class SensitivityJobResult:
    result: SensitivityResult
    allocation: dict[str, float] | None
    check: AllocationCheck | None
    json_path: Path
    plot_path: Path
    report_path: Path
    baseline_source: str


def _calibration(data: DataSplits, config: SensitivityConfig, device: torch.device) -> list:
    batches = data.train.batches(config.batch_size, shuffle=False, device=device)
    return list(itertools.islice(batches, config.calibration_batches))


def _check_allocation(
    baseline: nn.Module,
    result: SensitivityResult,
    allocation: dict[str, float],
    score: Any,
    example: torch.Tensor,
    calibration: list,
) -> AllocationCheck:
    """Prune a copy of ``baseline`` with ``allocation`` and measure what it saved and scores."""
    pruned = copy.deepcopy(baseline)
    if result.method is SensitivityMethod.UNSTRUCTURED:
        config = UnstructuredConfig(
            sparsity=0.0, scope="layer", criterion=result.criterion, per_layer=allocation
        )
        masks = prune_(pruned, config, calibration=calibration)
        zeros = sum(int((~m).sum()) for m in masks.masks.values())
        measured = zeros / result.total_cost
    else:
        config = StructuredConfig(
            ratio=0.0, scope="layer", criterion=result.criterion, per_layer=allocation
        )
        prune_(pruned, config, example_inputs=example, calibration=calibration)
        measured = result.total_cost / max(1, count_macs(pruned, example).dense)
    return AllocationCheck(
        predicted_savings=predicted_savings(result, allocation),
        predicted_score=result.baseline - predicted_drop(result, allocation),
        measured_savings=measured,
        measured_score=score(pruned),
    )


def _summary(
    result: SensitivityResult, config: SensitivityConfig, check: AllocationCheck
) -> list[str]:
    if result.method is SensitivityMethod.UNSTRUCTURED:
        what = f"target sparsity {config.target_sparsity:.1%} of all {result.total_cost:,} weights"
        pred, meas = f"{check.predicted_savings:.2%}", f"{check.measured_savings:.2%}"
        saving = "sparsity"
    else:
        what = f"target MAC reduction {config.target_macs:g}x of {result.total_cost:,} MACs/sample"
        pred, meas = f"{check.predicted_savings:.3g}x", f"{check.measured_savings:.3g}x"
        saving = "MAC reduction"
    return [
        f"{what}, no layer beyond ratio {config.max_ratio:g}",
        f"{saving}: predicted {pred}, measured {meas} on the baseline pruned with these ratios",
        f"{result.score_label}: predicted {check.predicted_score:.4g} (baseline minus the sum "
        f"of single-layer drops), measured {check.measured_score:.4g} with all layers pruned "
        f"at once and no fine-tuning (baseline {result.baseline:.4g})",
    ]


NOTES = [
    "Each layer was pruned alone: the drops do not add up exactly when several layers are "
    "pruned together, so the allocation's predicted score is a first-order estimate; the "
    "measured figures beside it come from actually pruning the baseline.",
    "Fine-tuning after pruning usually recovers much of a drop; the scan measures the model "
    "as it is right after pruning.",
]


def run_sensitivity(
    config: SensitivityConfig, *, console: Console | None = None
) -> SensitivityJobResult:
    """Run the sensitivity job described by ``config``; return the scan, allocation and paths.

    Writes ``sensitivity.json`` (:meth:`SensitivityResult.to_dict` plus a ``job`` entry with
    the recipe, allocation and its check), ``sensitivity.png`` and ``sensitivity.md`` to
    ``config.out``, each atomically.

    Raises:
        SecateurError: subclasses, one line each, for bad data, checkpoints, an unreachable
        target or an unwritable output folder.
    """
    console = console or Console()
    if importlib.util.find_spec("matplotlib") is None:  # fail before the scan, not after
        raise ConfigError(
            "the sensitivity job plots its curves with matplotlib: pip install 'secateur[plot]'"
        )
    out, device, data = _start_job(config, console)
    model, source = _baseline(config.baseline_config(), data, device, console)
    console.print(f"baseline {config.model}: {source}")

    def score(m: nn.Module) -> float:
        return 100.0 * evaluate(m, data.val)

    example = data.example_input.to(device)
    calibration = _calibration(data, config, device)
    result = sensitivity_scan(
        model,
        score,
        method=config.method,
        ratios=config.ratios,
        criterion=config.criterion,
        example_inputs=example,
        calibration=calibration,
        score_label=SCORE_LABEL,
        progress=config.progress,
    )
    allocation = check = None
    summary: list[str] = []
    if config.target is not None:
        allocation = allocate_ratios(
            result,
            target_sparsity=config.target_sparsity,
            target_macs_reduction=config.target_macs,
            max_ratio=config.max_ratio,
        )
        check = _check_allocation(model, result, allocation, score, example, calibration)
        summary = _summary(result, config, check)

    measured_on = f"top-1 accuracy on {len(data.val):,} validation images"
    console.print(sensitivity_table(result, allocation))
    console.print(
        f"  scored: {measured_on}, each layer pruned alone by {result.criterion} with no "
        "fine-tuning; cells are baseline minus score, in percentage points"
    )
    for line in summary:
        console.print(f"  {line}")
    json_path, plot_path, report_path = (
        out / "sensitivity.json",
        out / "sensitivity.png",
        out / "sensitivity.md",
    )
    job = {
        "recipe": config.to_dict(),
        "scored_on": measured_on,
        "baseline_source": source,
        "allocation": allocation,
        "allocation_check": None if check is None else dataclasses.asdict(check),
    }
    atomic_write_text(json_path, json.dumps({**result.to_dict(), "job": job}, indent=2) + "\n")
    plot_sensitivity(
        result,
        plot_path,
        title=f"{config.model}: {result.method.value} sensitivity, {result.criterion} criterion, "
        f"baseline accuracy {result.baseline:.4g}% ({len(data.val):,} validation images)",
    )
    setup = [
        ("model", config.model),
        ("data", f"{data.source} ({len(data.train):,} train, {len(data.val):,} val)"),
        ("baseline", source),
        ("method", result.method.value),
        ("criterion", result.criterion),
        ("ratios", ", ".join(f"{r:g}" for r in result.ratios)),
        ("score", measured_on),
        ("device", f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    atomic_write_text(
        report_path,
        sensitivity_markdown(
            result,
            title=f"secateur sensitivity: {config.model}",
            setup=setup,
            allocation=allocation,
            allocation_summary=summary,
            notes=NOTES,
            plot_name=plot_path.name,
        ),
    )
    console.print(f"saved {json_path}, {plot_path} and {report_path}")
    return SensitivityJobResult(
        result, allocation, check, json_path, plot_path, report_path, source
    )
