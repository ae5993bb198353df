"""Sweeps over pruning settings: prune a copy of a model at each setting, optionally recover it,
and measure every copy the same way, so accuracy, size on disk and latency can be traded off.

Every figure of a :class:`TradeoffPoint` is measured: the score by the caller's function, the
parameter and MAC counts by counting, the two file sizes by writing the files, and the latencies
of all points (baseline included) in one interleaved loop, so their ratios are fair on a noisy
machine. :func:`pareto_front` picks the points no other point beats on every axis at once.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._progress import make_progress
from ..errors import ConfigError
from ..export import CompressionConfig, save_compressed, tensors_to_save
from ..measure import Metrics, count_macs, count_params, layer_sparsity, measure_latencies
from ..pruning import (
    DepthConfig,
    MaskSet,
    SparseGPTConfig,
    StructuredConfig,
    UnstructuredConfig,
    prune_,
)

Score = Callable[[nn.Module], float]
Recover = Callable[[nn.Module, "MaskSet | None"], None]
PruningConfig = UnstructuredConfig | StructuredConfig | SparseGPTConfig | DepthConfig


@dataclass(frozen=True)
class TradeoffPoint:
    """One measured model of a sweep.

    ``method`` is ``baseline`` for the unpruned model, else the pruning config's kind
    (``unstructured``, ``structured``, ``sparsegpt``, ``depth``); ``ratio`` is its sparsity or
    ratio (0 for the baseline; for an N:M pattern, N/M's zero fraction). ``metrics.disk_bytes`` is
    the dense safetensors file of the state dict; ``compressed_bytes`` the lossless ``.secz``
    file (sparse index + exact values + zstd), ``None`` for a model without a
    ``secateur_spec`` (build it with ``zoo.create_model`` or ``zoo.from_transformers``).
    """

    label: str
    method: str
    ratio: float
    score: float
    metrics: Metrics
    compressed_bytes: int | None

    @property
    def stored_bytes(self) -> int:
        """The smaller file: what this model costs to store or ship."""
        sizes = [b for b in (self.metrics.disk_bytes, self.compressed_bytes) if b is not None]
        return min(sizes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "ratio": self.ratio,
            "score": self.score,
            "metrics": self.metrics.to_dict(),
            "compressed_bytes": self.compressed_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TradeoffPoint:
        return cls(
            label=str(data["label"]),
            method=str(data["method"]),
            ratio=float(data["ratio"]),
            score=float(data["score"]),
            metrics=Metrics.from_dict(data["metrics"]),
            compressed_bytes=data.get("compressed_bytes"),
        )


@dataclass(frozen=True)
class SweepResult:
    """The baseline (``points[0]``) and every swept setting, in the order given.

    ``front`` holds the indices of the Pareto-optimal points for (higher score, fewer stored
    bytes, lower latency): no other point is at least as good on all three and better on one.
    """

    points: tuple[TradeoffPoint, ...]
    front: tuple[int, ...]
    score_label: str

    @property
    def baseline(self) -> TradeoffPoint:
        return self.points[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score_label": self.score_label,
            "front": list(self.front),
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        return cls(
            points=tuple(TradeoffPoint.from_dict(p) for p in data["points"]),
            front=tuple(int(i) for i in data["front"]),
            score_label=str(data["score_label"]),
        )


def pareto_front(objectives: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """Indices of the rows that no other row dominates, every column to be *minimised*.

    Row ``a`` dominates ``b`` when it is ``<=`` in every column and ``<`` in one. Equal rows do
    not dominate each other, so duplicates are all kept.

    Example:
        >>> pareto_front([(1, 5), (2, 2), (3, 3), (5, 1)])
        (0, 1, 3)
    """
    rows = [tuple(float(v) for v in row) for row in objectives]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return tuple(i for i, row in enumerate(rows) if not any(dominates(o, row) for o in rows))


def _kind(config: PruningConfig) -> tuple[str, float]:
    if isinstance(config, UnstructuredConfig | SparseGPTConfig):
        kind = "unstructured" if isinstance(config, UnstructuredConfig) else "sparsegpt"
        if config.nm:
            n, m = (int(v) for v in str(config.nm).split(":"))
            return kind, 1.0 - n / m
        return kind, float(config.sparsity)
    if isinstance(config, StructuredConfig):
        return "structured", float(config.ratio)
    if isinstance(config, DepthConfig):
        return "depth", float(config.ratio)
    raise ConfigError(
        f"cannot sweep a {type(config).__name__}: pass UnstructuredConfig, StructuredConfig, "
        "SparseGPTConfig or DepthConfig objects"
    )


def _label(config: PruningConfig) -> str:
    kind, ratio = _kind(config)
    nm = getattr(config, "nm", None)
    return f"{kind} {nm}" if nm else f"{kind} {ratio:g}"


def _measure_files(model: nn.Module, folder: Path, index: int) -> tuple[int, int | None]:
    """Bytes of the dense safetensors file and of the lossless ``.secz`` file, both written."""
    dense = folder / f"{index}.safetensors"
    state, _ = tensors_to_save(model)  # tied weights once, as save_model stores them
    save_file(state, str(dense))
    if getattr(model, "secateur_spec", None) is None:
        return dense.stat().st_size, None
    packed = save_compressed(model, folder / f"{index}.secz", CompressionConfig(values="exact"))
    return dense.stat().st_size, packed.stat().st_size


def _pruned_copy(
    model: nn.Module,
    config: PruningConfig,
    recover: Recover | None,
    example_inputs: Any,
    calibration: Any,
) -> nn.Module:
    pruned = copy.deepcopy(model)
    needs_example = isinstance(config, StructuredConfig | DepthConfig)
    removed = prune_(
        pruned,
        config,
        example_inputs=example_inputs if needs_example else None,
        calibration=calibration,
    )
    masks = removed if isinstance(removed, MaskSet) else None
    if recover is not None:
        recover(pruned, masks)
    if masks is not None:
        masks.make_permanent()
    return pruned


def sweep(
    model: nn.Module,
    configs: Sequence[PruningConfig],
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    score: Score,
    recover: Recover | None = None,
    calibration: Any = None,
    score_label: str = "score",
    latency_runs: int = 50,
    progress: bool = True,
) -> SweepResult:
    """Prune a copy of ``model`` with each config, recover it, and measure all copies alike.

    Args:
        model: the trained model; it is not modified.
        configs: pruning configs (one-shot), e.g. ``[UnstructuredConfig(sparsity=s) for s in
            (0.5, 0.8)]``; structured and depth configs are traced on ``example_inputs``.
        example_inputs: one batch on the model's device; its batch size is the latency batch.
        score: ``model -> float``, higher is better (e.g. validation accuracy in %).
        recover: optional ``(pruned, masks) -> None`` run after pruning (fine-tuning,
            distillation); ``masks`` is the :class:`MaskSet` for weight pruning, else ``None``.
            Masks are made permanent afterwards.
        calibration: batches for data criteria and SparseGPT.
        latency_runs: timed rounds of the one interleaved loop over all models (>= 20).

    Returns:
        A :class:`SweepResult` whose first point is the unpruned model.

    Raises:
        ConfigError: no configs, or a config of a kind that cannot be swept.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> res = sweep(net, [UnstructuredConfig(sparsity=0.5)], example_inputs=torch.zeros(1, 8),
        ...             score=lambda m: 0.0, latency_runs=20, progress=False)
        >>> [p.label for p in res.points], res.points[1].metrics.nonzero_params < 90
        (['baseline', 'unstructured 0.5'], True)
    """
    if not configs:
        raise ConfigError("sweep needs at least one pruning config, e.g. [UnstructuredConfig()]")
    kinds = [_kind(c) for c in configs]  # refuses unknown config types before any work
    models: list[nn.Module] = [model]
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("sweep", total=len(configs), status="")
        for config in configs:
            bar.update(task, status=_label(config))
            models.append(_pruned_copy(model, config, recover, example_inputs, calibration))
            bar.advance(task)
    latencies = measure_latencies(models, example_inputs, runs=latency_runs, progress=progress)
    points = []
    labels = ["baseline", *(_label(c) for c in configs)]
    kinds = [("baseline", 0.0), *kinds]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (m, latency) in enumerate(zip(models, latencies, strict=True)):
            dense_bytes, packed_bytes = _measure_files(m, Path(tmp), i)
            total, nonzero = count_params(m)
            macs = count_macs(m, example_inputs)
            metrics = Metrics(
                params=total,
                nonzero_params=nonzero,
                macs=macs.dense,
                nonzero_macs=macs.nonzero,
                layers=layer_sparsity(m),
                latency=latency,
                disk_bytes=dense_bytes,
            )
            kind, ratio = kinds[i]
            points.append(
                TradeoffPoint(labels[i], kind, ratio, float(score(m)), metrics, packed_bytes)
            )
    front = pareto_front(
        [(-p.score, p.stored_bytes, p.metrics.latency.median_ms) for p in points]  # type: ignore[union-attr]
    )
    return SweepResult(tuple(points), front, score_label)
