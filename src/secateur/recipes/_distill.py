"""The ``distill`` job: data → teacher (trained or cached) → student distilled from it → measure
both → save → report.

The teacher comes from the compress job's baseline step (same cache, same key), so a teacher
trained for ``compress`` with equal settings is reused here and the other way round.
"""

from __future__ import annotations

import math
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
from ..export import save_model
from ..measure import Metrics
from ..recovery import DistillConfig, check_feature_names, distill
from ..report import comparison_table, conditions, markdown_report
from ..training import EpochRecord, LRSchedule, TrainConfig
from ..zoo import create_model, list_models
from ._compress import (
    _baseline,
    _data_metadata,
    _measure_pair,
    _measure_saved,
    _model_kwargs,
    _start_job,
)
from ._compress_config import CompressConfig


@dataclass(frozen=True)
class DistillJobConfig:
    """Train (or reuse) a teacher zoo model, distill a smaller zoo student from it, measure both.

    ``teacher`` is trained for ``teacher_epochs`` at ``teacher_lr`` (or reused from the cache
    shared with ``compress``, or loaded from ``teacher_checkpoint``). ``student`` is built fresh
    (``student_width_mult`` scales a VGG student's widths) and trained for ``epochs`` at ``lr``
    with the loss of :func:`secateur.recovery.distill`: ``temperature``, ``alpha``, and
    ``features`` pairs (student module, teacher module) weighted by ``feature_weight``.
    ``limit`` caps train and test images (quick trials); ``threads=None`` keeps torch's default.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> DistillJobConfig(teacher="resnet20", student="lenet5", alpha=0.5).distillation()
        DistillConfig(temperature=4.0, alpha=0.5, features=(), feature_weight=1.0)
    """

    teacher: str = "resnet20"
    student: str = "lenet5"
    student_width_mult: float | None = None
    teacher_checkpoint: str | None = None
    data: str | None = None
    temperature: float = 4.0
    alpha: float = 0.9
    features: tuple[tuple[str, str], ...] = ()
    feature_weight: float = 1.0
    epochs: int = 8
    teacher_epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    teacher_lr: float = 0.05
    schedule: LRSchedule = LRSchedule.COSINE
    seed: int = 0
    device: str = "auto"
    out: str = "secateur-distill"
    cache: bool = True
    limit: int | None = None
    threads: int | None = None
    latency_runs: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        for role in ("teacher", "student"):
            name = getattr(self, role)
            if name not in list_models():
                raise ConfigError(
                    f"unknown {role} model '{name}': choose one of {', '.join(list_models())}"
                )
        if self.student_width_mult is not None:
            check_range("student_width_mult", self.student_width_mult, 0.0, low_open=True)
        object.__setattr__(self, "schedule", coerce_enum("schedule", LRSchedule, self.schedule))
        check_int("epochs", self.epochs, 1)
        check_int("teacher_epochs", self.teacher_epochs, 1)
        check_range("teacher_lr", self.teacher_lr, 0.0, low_open=True)
        check_int("latency_runs", self.latency_runs, 20)
        if self.limit is not None:
            check_int("limit", self.limit, 10)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        object.__setattr__(self, "features", self.distillation().features)
        self.student_training()  # validates epochs, batch_size, lr
        self.teacher_baseline()  # validates teacher_epochs, teacher_lr

    def distillation(self) -> DistillConfig:
        return DistillConfig(
            temperature=self.temperature,
            alpha=self.alpha,
            features=self.features,
            feature_weight=self.feature_weight,
        )

    def student_training(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            schedule=self.schedule,
            seed=self.seed + 1,
        )

    def teacher_baseline(self) -> CompressConfig:
        """The compress job's view of the teacher: its ``baseline_training()`` and cache key."""
        return CompressConfig(
            model=self.teacher,
            data=self.data,
            epochs=self.teacher_epochs,
            batch_size=self.batch_size,
            lr=self.teacher_lr,
            schedule=self.schedule,
            seed=self.seed,
            device=self.device,
            out=self.out,
            baseline=self.teacher_checkpoint,
            cache=self.cache,
            limit=self.limit,
            threads=self.threads,
            latency_runs=self.latency_runs,
            progress=self.progress,
        )

    def to_dict(self) -> dict[str, Any]:
        out = config_to_dict(self)
        out["features"] = [list(pair) for pair in self.features]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillJobConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class DistillResult:
    teacher: Metrics
    student: Metrics
    teacher_path: Path
    student_path: Path
    report_path: Path
    teacher_source: str
    history: tuple[EpochRecord, ...]


def _student(config: DistillJobConfig, data: DataSplits, device: torch.device) -> nn.Module:
    kwargs: dict[str, Any] = _model_kwargs(data)
    if config.student_width_mult is not None:
        kwargs["width_mult"] = config.student_width_mult
    torch.manual_seed(config.seed)
    return create_model(config.student, **kwargs).to(device)


def _name(model: nn.Module, fallback: str) -> str:
    return getattr(model, "secateur_spec", {}).get("name", fallback)


def _notes(
    teacher: Metrics, student: Metrics, history: list[EpochRecord], config: DistillConfig
) -> list[str]:
    notes = ["In the table, 'before' is the teacher and 'after' the distilled student."]
    if teacher.accuracy is not None and student.accuracy is not None:
        notes.append(
            f"The student reaches {student.accuracy.top1:.2%} top-1 against the teacher's "
            f"{teacher.accuracy.top1:.2%} with {student.params:,} parameters against "
            f"{teacher.params:,} and {student.macs:,} MACs per sample against {teacher.macs:,}."
        )
    last = history[-1]
    val = "not measured" if math.isnan(last.val_top1) else f"{last.val_top1:.2%}"
    terms = [("soft KL", config.alpha > 0), ("hard CE", config.alpha < 1)]
    terms.append(("feature MSE", bool(config.features) and config.feature_weight > 0))
    loss = " + ".join(name for name, used in terms if used)
    notes.append(
        f"Distillation ran {len(history)} epoch(s); in the last one the mean training loss "
        f"({loss}) was {last.train_loss:.4f} and the validation top-1 {val}."
    )
    if teacher.latency is not None and student.latency is not None:
        notes.append(
            "Both models were timed interleaved in one loop; latency need not fall in proportion "
            "to MACs, since each layer call also has fixed costs."
        )
    return notes


def run_distill(config: DistillJobConfig, *, console: Console | None = None) -> DistillResult:
    """Run the distill job described by ``config``; return both measurements and the paths.

    Writes ``teacher.safetensors``, ``student.safetensors`` (each with its JSON manifest,
    metrics included) and ``report.md`` to ``config.out``.

    Raises:
        SecateurError: subclasses, one line each, for bad data, checkpoints, feature names or
        output folders; nothing half-written is left in ``config.out``.
    """
    console = console or Console()
    out, device, data = _start_job(config, console)
    student = _student(config, data, device)
    if config.features and config.teacher_checkpoint is None:
        # A bad module name is caught before minutes of teacher training, not after.
        check_feature_names(
            student, create_model(config.teacher, **_model_kwargs(data)), config.features
        )

    teacher, source = _baseline(config.teacher_baseline(), data, device, console)
    teacher_name = _name(teacher, config.teacher)
    console.print(f"teacher {teacher_name}: {source}")
    meta = {"data": _data_metadata(data), "recipe": config.to_dict()}
    teacher_path = save_model(teacher, out / "teacher.safetensors", metadata=meta)
    before = _measure_saved(teacher, teacher_path, data, device, config.progress)

    distill_cfg = config.distillation()
    history = distill(
        student,
        teacher,
        data,
        config.student_training(),
        distill_cfg,
        progress=config.progress,
    )
    student_path = save_model(
        student,
        out / "student.safetensors",
        metadata={**meta, "distillation": distill_cfg.to_dict()},
    )
    before, after = _measure_pair(
        before, teacher, teacher_path, student, student_path, data, device, config
    )

    notes = _notes(before, after, history, distill_cfg)
    title = f"secateur distill: {teacher_name} → {config.student}"
    console.print(comparison_table(before, after, title=f"{title} (before = teacher)"))
    for line in conditions(after):
        console.print(f"  {line}")
    for note in notes:
        console.print(f"  {note}")
    features = ", ".join(f"{s} ← {t}" for s, t in distill_cfg.features) or "none"
    width = f" (width_mult {config.student_width_mult})" if config.student_width_mult else ""
    setup = [
        ("teacher", f"{teacher_name}, {source}"),
        ("student", f"{config.student}{width}, trained from scratch by distillation"),
        ("data", f"{data.source} ({len(data.train):,} train, {len(data.test):,} test)"),
        (
            "distillation",
            f"temperature {distill_cfg.temperature}, alpha {distill_cfg.alpha} (soft KL) / "
            f"{1 - distill_cfg.alpha:g} (hard CE), feature pairs (student ← teacher): "
            f"{features}, feature weight {distill_cfg.feature_weight}",
        ),
        (
            "student training",
            f"{config.epochs} epochs, lr {config.lr}, batch {config.batch_size}, "
            f"{config.schedule.value}",
        ),
        ("device", f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    report_path = out / "report.md"
    atomic_write_text(
        report_path, markdown_report(before, after, title=title, setup=setup, notes=notes)
    )
    console.print(f"saved {student_path}, {teacher_path} and {report_path}")
    return DistillResult(
        before, after, teacher_path, student_path, report_path, source, tuple(history)
    )
