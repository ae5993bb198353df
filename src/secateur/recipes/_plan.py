"""The ``plan`` job: data → baseline (trained or cached, as ``compress`` does) → the least
pruning that meets a device's budget (``explore.plan_for_budget``, chosen on the validation
split) → carried out with fine-tuning after each stage → ``model.secz``, ``plan.json`` and
``plan.md``, with every limit checked on the reloaded file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text
from .._config import check_int, config_from_dict, config_to_dict, split_names
from ..errors import ConfigError
from ..explore import (
    LATENCY_MARGIN,
    SHAPE_METHODS,
    Budget,
    Plan,
    PlanOutcome,
    apply_plan,
    plan_for_budget,
)
from ..export import CompressionConfig
from ..pruning import StructuredConfig, UnstructuredConfig
from ..report import plan_markdown, plan_summary, plan_table
from ..training import LRSchedule, evaluate
from ._compress import _baseline, _calibration, _data_metadata, _recover, _start_job
from ._compress_config import CompressConfig, compress_settings

CODINGS = ("exact", "float16", "int8", "codebook6", "codebook5", "codebook4")


def _coding(name: str) -> CompressionConfig:
    if name.startswith("codebook") and name[len("codebook") :].isdigit():
        return CompressionConfig(values="codebook", bits=int(name[len("codebook") :]))
    if name in ("exact", "float16", "int8"):
        return CompressionConfig(values=name)
    raise ConfigError(
        f"unknown coding {name!r}: choose from exact, float16, int8 or codebookN with N bits "
        "in 1..8, e.g. codebook5"
    )


@dataclass(frozen=True)
class PlanConfig:
    """Meet a target device's budget with the least pruning, found and checked by measurement.

    Limits (at least one): ``max_file_bytes`` (the ``.secz`` file: storage), ``max_params``
    (the loaded model's parameters: runtime weight memory), ``max_macs`` (per sample) and
    ``max_latency_ms`` (median at batch 1 on this machine) or ``min_speedup`` (over the
    baseline, both timed in one loop). Parameters, MACs and latency are met
    by narrowing the model, the better scoring on the validation split of ``shape_methods``:
    ``channels`` (``criterion``, ``round_to``, ``max_ratio``; ``reconstruct`` refits the
    layers reading removed channels by least squares, in every probe too) and ``blocks`` (whole residual
    blocks, for models that have them); the file size by global
    magnitude sparsity under the best of ``codings`` (``exact``, ``float16``, ``int8``,
    ``codebookN``), chosen on the validation split. Each stage is fine-tuned for
    ``finetune_epochs`` (codebooks: their centroids). Baseline and training settings mean what
    they mean in :class:`CompressConfig`.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> PlanConfig(max_macs=100_000).budget().max_macs
        100000
    """

    max_file_bytes: int | None = None
    max_params: int | None = None
    max_macs: int | None = None
    max_latency_ms: float | None = None
    min_speedup: float | None = None
    model: str = "lenet_300_100"
    data: str | None = None
    criterion: str | None = None
    round_to: int = 1
    max_ratio: float = 0.9
    reconstruct: bool = False
    codings: tuple[str, ...] = CODINGS
    shape_methods: tuple[str, ...] = SHAPE_METHODS
    calibration_batches: int = 8
    finetune_epochs: int = 2
    finetune_lr: float = 0.02
    recalibrate_bn: bool = True
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    schedule: LRSchedule = LRSchedule.COSINE
    seed: int = 0
    device: str = "auto"
    out: str = "secateur-plan"
    baseline: str | None = None
    cache: bool = True
    limit: int | None = None
    threads: int | None = None
    latency_runs: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        codings = split_names(self.codings)
        if not codings:
            raise ConfigError("codings must list one or more of " + ", ".join(CODINGS))
        object.__setattr__(self, "codings", codings)
        self.compression()  # validates each coding
        methods = split_names(self.shape_methods)
        if (
            not methods
            or any(m not in SHAPE_METHODS for m in methods)
            or len(set(methods)) != len(methods)
        ):
            raise ConfigError(
                f"shape_methods {methods!r}: name each of {', '.join(SHAPE_METHODS)} at most "
                "once, at least one, e.g. channels,blocks"
            )
        object.__setattr__(self, "shape_methods", tuple(methods))
        check_int("latency_runs", self.latency_runs, 20)
        self.budget()
        self.structured()
        self.common()

    def budget(self) -> Budget:
        return Budget(
            self.max_file_bytes,
            self.max_params,
            self.max_macs,
            self.max_latency_ms,
            self.min_speedup,
        )

    def compression(self) -> list[CompressionConfig]:
        return [_coding(c) for c in self.codings]

    def structured(self) -> StructuredConfig:
        extra = {} if self.criterion is None else {"criterion": self.criterion}
        return StructuredConfig(
            ratio=0.0,
            round_to=self.round_to,
            max_ratio=self.max_ratio,
            reconstruct=self.reconstruct,
            **extra,
        )

    def common(self) -> CompressConfig:
        """The baseline and fine-tuning settings, as a compress job (``criterion``,
        ``round_to`` and ``reconstruct`` are the structured stage's, see :meth:`structured`)."""
        return compress_settings(self, skip=("criterion", "round_to", "reconstruct"))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class PlanJobResult:
    plan: Plan
    outcome: PlanOutcome
    model_path: Path
    json_path: Path
    report_path: Path
    baseline_source: str


def run_plan(config: PlanConfig, *, console: Console | None = None) -> PlanJobResult:
    """Run the plan job described by ``config``; write ``model.secz``, ``plan.json`` and
    ``plan.md`` to ``config.out`` (each atomically).

    A limit missed on the final measurement (a latency that timed slower this time, a file
    still over at 99% sparsity) is reported as ``NOT met``, with the files written so the
    shortfall can be read; ``outcome.met`` says so, and the CLI exits 1.

    Raises:
        SecateurError: subclasses, one line each, for bad data or checkpoints, a budget out of
        reach (before any fine-tuning), or an unwritable output folder.
    """
    console = console or Console()
    common = config.common()
    out, device, data = _start_job(common, console)
    model, source = _baseline(common, data, device, console)
    console.print(f"baseline {config.model}: {source}")
    example = data.example_input.to(device)
    calibration = _calibration(common, data, device)

    def val_score(m: nn.Module) -> float:
        return 100.0 * evaluate(m, data.val)

    def test_score(m: nn.Module) -> float:
        return 100.0 * evaluate(m, data.test)

    def recover(m: nn.Module, constraint: Any) -> None:
        _recover(m, model, data, common, constraint)

    metadata = {"data": _data_metadata(data), "recipe": config.to_dict()}
    console.print("searching: pruned copies are measured against the budget")
    plan = plan_for_budget(
        model,
        config.budget(),
        example_inputs=example,
        score=val_score,
        calibration=calibration,
        structured=config.structured(),
        weights=UnstructuredConfig(sparsity=0.0),
        codings=config.compression(),
        latency_runs=config.latency_runs,
        metadata=metadata,
        shape_methods=config.shape_methods,
        recalibrate_bn=config.recalibrate_bn,
    )
    console.print(f"plan: {plan_summary(plan, plan.sparsity)}")
    model_path = out / "model.secz"
    outcome = apply_plan(
        model,
        plan,
        model_path,
        example_inputs=example,
        score=test_score,
        recover=recover,
        calibration=calibration,
        latency_runs=config.latency_runs,
        metadata=metadata,
    )
    console.print(plan_table(plan, outcome))
    base_test = test_score(model)
    console.print(
        f"  test top-1 on {len(data.test):,} images: baseline {base_test:.2f}% → "
        f"{outcome.figures.score:.2f}% (the reloaded {model_path.name}); latency: "
        f"{outcome.figures.latency.conditions()}, timed interleaved with the baseline"
    )
    json_path, report_path = out / "plan.json", out / "plan.md"
    saved = {
        "recipe": config.to_dict(),
        "baseline_source": source,
        "baseline_test_score": base_test,
        "scored_on": {
            "plan": f"top-1 accuracy (%) on {len(data.val):,} validation images (search only)",
            "outcome": f"top-1 accuracy (%) on {len(data.test):,} test images",
        },
        "plan": plan.to_dict(),
        "outcome": {
            "path": str(model_path),
            "sparsity": outcome.sparsity,
            "figures": outcome.figures.to_dict(),
            "baseline_latency_ms": outcome.baseline_latency.median_ms,
            "met": outcome.met,
        },
    }
    setup = [
        ("model", config.model),
        ("data", f"{data.source} ({len(data.train):,} train, {len(data.test):,} test)"),
        ("baseline", source),
        ("recovery", f"fine-tuning, {config.finetune_epochs} epoch(s) per stage"),
        ("device", f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    notes = [
        "Parameters, MACs and latency only fall when the model gets narrower, so those limits "
        "are met by structured pruning; zeroed weights shrink only the compressed file (the "
        "loaded model is dense again).",
    ]
    if plan.candidates:
        notes.append(
            "The codings were compared one-shot on the validation split; the accuracies of "
            "the baseline and the planned model are on the test split."
        )
    if plan.budget.timed:
        notes.append(
            f"A latency probe had to beat its limit by {LATENCY_MARGIN:.0%}, since timing "
            "varies by a few percent between runs; the final model was timed again. A speedup "
            "is the baseline's median over the model's, both timed in one interleaved loop."
        )
    report = plan_markdown(
        plan,
        outcome,
        title=f"secateur plan: {config.model}",
        baseline_score=base_test,
        score_label="Test top-1 accuracy (%)",
        selection_label="one-shot val top-1 (%)",
        setup=setup,
        notes=notes,
    )
    atomic_write_text(report_path, report)
    atomic_write_text(json_path, json.dumps(saved, indent=2) + "\n")  # last: the job finished
    console.print(f"saved {model_path}, {json_path} and {report_path}")
    return PlanJobResult(plan, outcome, model_path, json_path, report_path, source)
