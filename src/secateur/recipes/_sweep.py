"""The ``sweep`` job: data → baseline (trained or cached, as ``compress`` does) → for each method
and ratio, prune a copy one-shot and fine-tune it → measure all copies alike → ``sweep.json``,
``sweep.png`` (accuracy against bytes on disk and latency) and ``sweep.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text
from .._config import check_int, check_range, config_from_dict, config_to_dict, split_names
from ..errors import ConfigError
from ..explore import SweepResult, sweep
from ..pruning import DepthConfig, DepthResult, MaskSet, prune_
from ..report import plot_tradeoff, tradeoff_markdown, tradeoff_table
from ..training import LRSchedule, evaluate
from ..zoo import create_model
from ._compress import (
    _baseline,
    _calibration,
    _model_kwargs,
    _recover,
    _start_job,
)
from ._compress_config import CompressConfig, CompressMethod, Recovery, compress_settings

#: The CompressConfig field each method's ratio goes to.
RATIO_FIELD = {
    CompressMethod.UNSTRUCTURED: "sparsity",
    CompressMethod.SPARSEGPT: "sparsity",
    CompressMethod.STRUCTURED: "ratio",
    CompressMethod.DEPTH: "depth_ratio",
}
SCORE_LABEL = "test top-1 accuracy (%)"


@dataclass(frozen=True)
class SweepConfig:
    """Prune a trained zoo model at every ``ratio`` with every one of ``methods``, fine-tune each
    copy for ``finetune_epochs``, and measure all of them and the baseline the same way.

    ``ratios`` is the sparsity for ``unstructured``/``sparsegpt``, the channel ratio for
    ``structured`` and the block ratio for ``depth``. Pruning is one-shot; ``reconstruct``
    refits the readers of removed units for the ``structured`` points; ``criterion``,
    ``scope``, ``round_to``, ``calibration_batches``, ``recovery`` (``finetune`` or
    ``distill`` from the baseline, with ``temperature``/``alpha``), ``recalibrate_bn`` and the
    training settings mean what they mean in :class:`CompressConfig`, whose validation they go
    through. The
    baseline is trained, reused from the cache or loaded from ``baseline`` exactly as
    ``compress`` does it.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> SweepConfig(methods=("structured",), ratios=(0.25, 0.5)).points()[1].ratio
        0.5
    """

    model: str = "lenet5"
    data: str | None = None
    methods: tuple[CompressMethod, ...] = (CompressMethod.UNSTRUCTURED, CompressMethod.STRUCTURED)
    ratios: tuple[float, ...] = (0.5, 0.7, 0.9)
    criterion: str | None = None
    scope: str | None = None
    round_to: int = 1
    reconstruct: bool = False
    calibration_batches: int = 8
    finetune_epochs: int = 1
    finetune_lr: float = 0.02
    recovery: Recovery = Recovery.FINETUNE
    recalibrate_bn: bool = True
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    schedule: LRSchedule = LRSchedule.COSINE
    seed: int = 0
    device: str = "auto"
    out: str = "secateur-sweep"
    baseline: str | None = None
    cache: bool = True
    limit: int | None = None
    threads: int | None = None
    latency_runs: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        methods = split_names(self.methods)
        if not methods:
            raise ConfigError(
                "methods must list one or more of unstructured, sparsegpt, structured, depth, "
                "e.g. methods: [unstructured, structured]"
            )
        allowed = ", ".join(m.value for m in CompressMethod)
        parsed = []
        for m in methods:
            try:
                parsed.append(CompressMethod(m))
            except ValueError:
                raise ConfigError(
                    f"unknown method {m!r} in methods: choose from {allowed}"
                ) from None
        if len(set(parsed)) != len(parsed):
            raise ConfigError("methods lists a method twice: name each once")
        object.__setattr__(self, "methods", tuple(parsed))
        ratios = self.ratios
        if not isinstance(ratios, list | tuple) or not ratios:
            raise ConfigError("ratios must list one or more numbers in (0, 1), e.g. [0.5, 0.9]")
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, int | float):
                raise ConfigError(f"ratios item {r!r} is not a number: write e.g. [0.5, 0.9]")
            check_range("ratios item", r, 0.0, 1.0, low_open=True, high_open=True)
        object.__setattr__(self, "ratios", tuple(sorted(float(r) for r in set(ratios))))
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_int("latency_runs", self.latency_runs, 20)
        if self.reconstruct is True and CompressMethod.STRUCTURED not in parsed:
            raise ConfigError(
                "reconstruct refits after structured pruning only: add structured to methods "
                "(--methods) or drop reconstruct (--reconstruct)"
            )
        self.points()  # every point goes through CompressConfig's validation

    def common(self) -> CompressConfig:
        """The settings every point shares, as a compress job (its ratio fields unset)."""
        return compress_settings(self, skip=("reconstruct",))

    def points(self) -> list[CompressConfig]:
        """One compress config per (method, ratio), methods in the order given."""
        base = self.common()
        return [
            dataclasses.replace(
                base,
                method=m,
                **{RATIO_FIELD[m]: r},
                **({"reconstruct": self.reconstruct} if m is CompressMethod.STRUCTURED else {}),
            )
            for m in self.methods
            for r in self.ratios
        ]

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class SweepJobResult:
    result: SweepResult
    json_path: Path
    plot_path: Path
    report_path: Path
    baseline_source: str


NOTES = [
    "Every setting was pruned one-shot from the same baseline and fine-tuned with the same "
    "budget; rerun `secateur compress` with a setting to get its model and full report.",
    "Weight pruning (unstructured, sparsegpt) keeps the tensors' shapes: its safetensors file "
    "and dense latency stay those of the baseline, and only the `.secz` file (sparse index, "
    "exact values, zstd) shrinks. Structured and depth pruning make the model itself smaller "
    "and faster.",
    "Latencies a few percent apart are equal within the timing noise of a shared machine; a "
    "dense-speed setting can reach the Pareto front on that noise alone.",
]


def _check_blocks(model: nn.Module, config: SweepConfig, data: Any) -> None:
    """Fail before any training unless every depth ratio of the sweep removes a block. Which
    blocks exist depends on the architecture only, so copies of ``model`` are pruned and
    thrown away."""
    name = f"checkpoint {config.baseline}" if config.baseline else f"model {config.model}"
    example = data.example_input.to(next(model.parameters()).device)
    lowest, highest = config.ratios[0], config.ratios[-1]
    deepest = prune_(copy.deepcopy(model), DepthConfig(ratio=highest), example_inputs=example)
    assert isinstance(deepest, DepthResult)
    found = len(deepest.candidates)
    if not deepest.removed:
        what = "has no residual blocks" if not found else "cannot lose any residual block"
        raise ConfigError(f"{name} {what} to remove: drop depth from methods (--methods)")
    shallowest = prune_(copy.deepcopy(model), DepthConfig(ratio=lowest), example_inputs=example)
    assert isinstance(shallowest, DepthResult)
    if not shallowest.removed:
        least = (50 // found + 1) / 100  # the least 2-decimal ratio with round(r * found) >= 1
        raise ConfigError(
            f"depth at ratio {lowest:g} removes none of the {found} residual blocks of {name}: "
            f"use ratios of at least {least:g} (--ratios)"
        )


def run_sweep(config: SweepConfig, *, console: Console | None = None) -> SweepJobResult:
    """Run the sweep job described by ``config``; write ``sweep.json``, ``sweep.png`` and
    ``sweep.md`` to ``config.out`` (each atomically) and return the measured points.

    Raises:
        SecateurError: subclasses, one line each, for bad data, checkpoints, a model without
        residual blocks for ``depth``, or an unwritable output folder.
    """
    console = console or Console()
    if importlib.util.find_spec("matplotlib") is None:  # fail before the work, not after
        raise ConfigError("the sweep job plots with matplotlib: pip install 'secateur[plot]'")
    base = config.common()
    out, device, data = _start_job(base, console)
    depth = CompressMethod.DEPTH in config.methods
    if depth and config.baseline is None:  # before training: a model without blocks fails fast
        _check_blocks(create_model(config.model, **_model_kwargs(data)), config, data)
    model, source = _baseline(base, data, device, console)
    if depth and config.baseline is not None:
        _check_blocks(model, config, data)
    console.print(f"baseline {config.model}: {source}")

    def recover(pruned: nn.Module, masks: MaskSet | None) -> None:
        _recover(pruned, model, data, base, masks)

    def score(m: nn.Module) -> float:
        return 100.0 * evaluate(m, data.test)

    result = sweep(
        model,
        [p.pruning() for p in config.points()],
        example_inputs=data.example_input.to(device),
        score=score,
        recover=recover,
        calibration=_calibration(base, data, device),
        score_label=SCORE_LABEL,
        latency_runs=config.latency_runs,
        progress=config.progress,
    )
    console.print(tradeoff_table(result))
    latency = result.baseline.metrics.latency
    console.print(
        f"  score: test top-1 (%) on {len(data.test):,} images after {config.finetune_epochs} "
        f"fine-tuning epoch(s); smaller: baseline safetensors bytes ÷ the smaller file; faster: "
        f"baseline latency ÷ latency ({latency.conditions() if latency else 'not timed'}, "
        "all models in one interleaved loop)"
    )
    json_path, plot_path, report_path = (out / f"sweep.{s}" for s in ("json", "png", "md"))
    scored_on = f"top-1 accuracy on {len(data.test):,} test images"
    job = {"recipe": config.to_dict(), "scored_on": scored_on, "baseline_source": source}
    methods = ", ".join(m.value for m in config.methods)
    plot_tradeoff(
        result,
        plot_path,
        title=f"{config.model}: {methods} at ratios {', '.join(f'{r:g}' for r in config.ratios)}, "
        f"{config.finetune_epochs} fine-tuning epoch(s) each",
    )
    setup = [
        ("model", config.model),
        ("data", f"{data.source} ({len(data.train):,} train, {len(data.test):,} test)"),
        ("baseline", source),
        ("methods", methods),
        ("ratios", ", ".join(f"{r:g}" for r in config.ratios)),
        *(
            [("reconstruct", "structured points: readers refitted by least squares")]
            if config.reconstruct
            else []
        ),
        ("recovery", f"{config.recovery.value}, {config.finetune_epochs} epoch(s) per setting"),
        ("score", scored_on),
        ("device", f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    atomic_write_text(
        report_path,
        tradeoff_markdown(
            result,
            title=f"secateur sweep: {config.model}",
            setup=setup,
            notes=NOTES,
            plot_name=plot_path.name,
        ),
    )
    # last: a complete sweep.json means the job finished
    atomic_write_text(json_path, json.dumps({**result.to_dict(), "job": job}, indent=2) + "\n")
    console.print(f"saved {json_path}, {plot_path} and {report_path}")
    return SweepJobResult(result, json_path, plot_path, report_path, source)
