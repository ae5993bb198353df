"""A planner that meets a target device's budget, by measurement.

A budget has two sides.

**Compute** (``max_macs``, ``max_latency_ms``, ``min_speedup``) and **runtime weight memory**
(``max_params``: the loaded model is dense) only shrink when the model itself gets narrower, so
they are met by structured pruning. For channels, and for whole residual blocks where the model
has them, the smallest ratio that meets them is found by bisection, each probe a pruned copy
whose MACs and parameters are counted and whose latency is timed; the better scoring of the two
is kept.

**Storage** (``max_file_bytes``: the ``.secz`` file a device downloads or keeps in flash) is met
more cheaply by zeroing weights and coding the values. For every value coding (exact, float16,
int8, k-means codebooks) the smallest global sparsity whose file fits is bisected on the encoded
bytes, each candidate is decoded back and scored, and the best score wins.

:func:`apply_plan` then prunes for real, recovers after each stage, writes the file, reloads it
and measures whether each limit is met. Nothing is estimated: a probe that does not fit is never
taken, and the final figures come from the reloaded file.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..export import CompressionConfig, load_compressed, save_compressed
from ..pruning import DepthConfig, DepthResult, StructuredConfig, UnstructuredConfig, prune_
from ..recovery import recalibrate_batchnorm_
from ._budget import (
    SHAPE_LIMITS,
    Budget,
    Figures,
    excess,
    fits_limits,
    measure_figures,
)

Score = Callable[[nn.Module], float]
#: ``(model, constraint) -> None``: recover accuracy while ``constraint`` (masks, codebooks or
#: ``None`` after structured pruning) holds; e.g. fine-tuning with ``fit(..., constraint=c)``.
Recover = Callable[[nn.Module, Any], None]

#: Value codings tried for a storage budget, most faithful first.
DEFAULT_CODINGS = (
    CompressionConfig(values="exact"),
    CompressionConfig(values="float16"),
    CompressionConfig(values="int8"),
    CompressionConfig(values="codebook", bits=6),
    CompressionConfig(values="codebook", bits=5),
    CompressionConfig(values="codebook", bits=4),
)
_RATIO_STEPS = 8
#: How to narrow a model for shape-bound limits: remove channels, or whole residual blocks.
SHAPE_METHODS = ("channels", "blocks")
#: The highest block ratio tried (each stage keeps at least one block whatever the ratio).
MAX_BLOCK_RATIO = 0.95
_SPARSITY_STEPS = 10
MAX_SPARSITY = 0.99


@dataclass(frozen=True)
class Probe:
    """One measured step of a search: ``stage`` ``channels`` or ``blocks`` with a ratio, or
    ``weights`` with a sparsity under a ``coding``."""

    stage: str
    setting: float
    coding: str | None
    figures: Figures
    fits: bool


@dataclass(frozen=True)
class Plan:
    """What :func:`plan_for_budget` found. ``shape_method`` (``channels``, ``blocks`` or
    ``none``) and ``ratio``: how the model is narrowed for shape-bound limits, chosen among
    ``shapes`` (per method, the least ratio that fits, with its one-shot score);
    ``sparsity``: global weight sparsity after it; ``coding``: the file's value coding.
    ``probes`` lists every measured step, ``candidates`` the best fitting point per coding
    with its one-shot score (``None`` score: that coding cannot fit, even at 99% sparsity)."""

    budget: Budget
    ratio: float
    sparsity: float
    coding: CompressionConfig
    baseline: Figures
    probes: tuple[Probe, ...]
    candidates: tuple[Probe, ...]
    structured: StructuredConfig = field(default_factory=lambda: StructuredConfig(ratio=0.0))
    weights: UnstructuredConfig = field(default_factory=lambda: UnstructuredConfig(sparsity=0.0))
    shape_method: str = "none"
    shapes: tuple[Probe, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        def probe(p: Probe) -> dict[str, Any]:
            return {
                "stage": p.stage,
                "setting": p.setting,
                "coding": p.coding,
                "fits": p.fits,
                "figures": p.figures.to_dict(),
            }

        return {
            "budget": self.budget.to_dict(),
            "ratio": self.ratio,
            "sparsity": self.sparsity,
            "coding": self.coding.label,
            "compression": self.coding.to_dict(),
            "shape_method": self.shape_method,
            "structured": self.structured.to_dict(),
            "shapes": [probe(p) for p in self.shapes],
            "weights": self.weights.to_dict() | {"sparsity": self.sparsity},
            "baseline": self.baseline.to_dict(),
            "probes": [probe(p) for p in self.probes],
            "candidates": [probe(p) for p in self.candidates],
        }


def check_spec(model: nn.Module, why: str) -> None:
    if getattr(model, "secateur_spec", None) is None:
        raise ConfigError(
            f"{why} needs the model's .secz file, which needs a secateur_spec: build the model "
            "with zoo.create_model or wrap a transformers model with zoo.from_transformers"
        )


def _ranking_inputs(calibration: Any, example_inputs: Any) -> Any:
    """The inputs depth pruning ranks blocks on: a real batch when there is one (as the
    compress job does), else the example."""
    if isinstance(calibration, list | tuple) and calibration:
        first = calibration[0]
        if isinstance(first, list | tuple) and first:
            return first[0]
    return example_inputs


def narrow_(
    model: nn.Module,
    method: str,
    ratio: float,
    structured: StructuredConfig,
    example_inputs: Any,
    calibration: Any,
) -> bool:
    """Prune ``model`` in place by ``method`` at ``ratio``; False if nothing could go."""
    if method == "channels":
        config = dataclasses.replace(structured, ratio=ratio)
        prune_(model, config, example_inputs=example_inputs, calibration=calibration)
        return True
    result = prune_(
        model, DepthConfig(ratio=ratio), example_inputs=_ranking_inputs(calibration, example_inputs)
    )
    assert isinstance(result, DepthResult)
    return bool(result.removed)


def _out_of_reach(probes: list[Probe], budget: Budget, limits: Sequence[str]) -> str:
    """Why no narrowing meets the limits: each method's most pruned probe and what it missed."""
    tops = []
    for method in SHAPE_METHODS:
        mine = [p for p in probes if p.stage == method]
        if mine:  # the first probe of a method is its highest ratio
            missed = ", ".join(excess(mine[0].figures, budget, limits))
            tops.append(f"{method} at ratio {mine[0].setting:g}: {missed}")
    if not tops:
        return (
            "no shape method applies: the model has no residual block to remove; add channels "
            "to shape_methods (--shape-methods channels,blocks)"
        )
    return (
        f"budget out of reach: the most pruned probes still miss it ({'; '.join(tops)}); raise "
        "that limit, "
        "allow a higher structured max_ratio (--max-ratio), or start from a smaller model"
    )


def _search_ratio(
    model: nn.Module,
    method: str,
    budget: Budget,
    structured: StructuredConfig,
    example_inputs: Any,
    calibration: Any,
    latency_runs: int,
    probes: list[Probe],
) -> tuple[Probe, nn.Module] | None:
    """The probe at the smallest ratio of ``method`` (``channels`` or ``blocks``) whose pruned
    copy meets the shape-bound limits, by bisection, with that copy; ``None`` if even the
    highest ratio does not, or the model has no block to remove."""
    limits = SHAPE_LIMITS
    timed = latency_runs if budget.timed else None
    reference = model if budget.min_speedup is not None else None
    best: tuple[Probe, nn.Module] | None = None

    def probe(ratio: float) -> bool | None:
        nonlocal best
        pruned = copy.deepcopy(model)
        if not narrow_(pruned, method, ratio, structured, example_inputs, calibration):
            return None
        figures = measure_figures(pruned, example_inputs, latency_runs=timed, reference=reference)
        fits = fits_limits(figures, budget, limits)
        probes.append(Probe(method, ratio, None, figures, fits))
        if fits:  # bisection only lowers the fitting ratio: the latest fit is the best
            best = probes[-1], pruned
        return fits

    high = structured.max_ratio if method == "channels" else MAX_BLOCK_RATIO
    if not probe(high):
        return None
    low = 0.0
    for _ in range(_RATIO_STEPS):
        mid = (low + high) / 2
        if probe(mid):
            high = mid
        else:
            low = mid
    return best


def _search_sparsity(
    model: nn.Module,
    budget: Budget,
    weights: UnstructuredConfig,
    coding: CompressionConfig,
    example_inputs: Any,
    calibration: Any,
    probes: list[Probe],
    metadata: dict[str, Any] | None,
) -> float | None:
    """Smallest global sparsity whose file under ``coding`` fits ``max_file_bytes``, or
    ``None`` if even :data:`MAX_SPARSITY` does not."""
    label = coding.label

    def probe(sparsity: float) -> bool:
        pruned = copy.deepcopy(model)
        if sparsity > 0:
            config = dataclasses.replace(weights, sparsity=sparsity)
            prune_(pruned, config, calibration=calibration).make_permanent()
        figures = measure_figures(pruned, example_inputs, coding=coding, metadata=metadata)
        fits = fits_limits(figures, budget, ("max_file_bytes",))
        probes.append(Probe("weights", sparsity, label, figures, fits))
        return fits

    if probe(0.0):
        return 0.0
    if not probe(MAX_SPARSITY):
        return None
    low, high = 0.0, MAX_SPARSITY
    for _ in range(_SPARSITY_STEPS):
        mid = (low + high) / 2
        if probe(mid):
            high = mid
        else:
            low = mid
    return high


def _decoded(
    model: nn.Module, coding: CompressionConfig, folder: Path, metadata: dict[str, Any] | None
) -> nn.Module:
    """``model`` written under ``coding`` and read back: what a device would run."""
    path = save_compressed(model, folder / "candidate.secz", coding, metadata=metadata)
    device = next(model.parameters()).device
    return load_compressed(path, device=str(device)).model


def _score(model: nn.Module, score: Score, calibration: Any, recalibrate_bn: bool) -> float:
    """``score(model)``, its BatchNorm statistics re-estimated first (in place) when asked and
    there are calibration batches."""
    if recalibrate_bn and calibration is not None:
        recalibrate_batchnorm_(model, calibration)
    return float(score(model))


def plan_for_budget(
    model: nn.Module,
    budget: Budget,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    score: Score,
    calibration: Any = None,
    structured: StructuredConfig | None = None,
    weights: UnstructuredConfig | None = None,
    codings: Sequence[CompressionConfig] = DEFAULT_CODINGS,
    latency_runs: int = 50,
    metadata: dict[str, Any] | None = None,
    shape_methods: Sequence[str] = SHAPE_METHODS,
    recalibrate_bn: bool = True,
) -> Plan:
    """Find, by measurement, the least pruning that meets ``budget``; ``model`` is not changed.

    Shape-bound limits (parameters, MACs, latency) are met by narrowing the model. For each of
    ``shape_methods``, the smallest ratio that meets them is bisected over pruned copies:
    ``channels`` (``structured``, up to its ``max_ratio``) and ``blocks`` (whole residual blocks,
    least influential first, skipped for a model without any). A latency probe must come
    :data:`LATENCY_MARGIN` under the limit. Each method's copy at its ratio is scored, and the
    best one is kept. A
    ``max_file_bytes`` limit then picks, for each of ``codings``, the smallest ``weights``
    sparsity whose ``.secz`` file fits, decodes each such file, scores it with ``score``
    (higher is better; use held-out data) and keeps the best. No training runs here: candidates
    are compared one-shot, and :func:`apply_plan` recovers the chosen one. With
    ``recalibrate_bn`` and ``calibration``, each candidate's BatchNorm statistics are first
    re-estimated on the calibration batches (without it, a one-shot narrowed BN network scores
    near chance and the comparison says nothing).

    Cost: every probe of a file limit encodes the whole model, about 13 times per coding. That is
    instant for the zoo's models, but at the scale of all-MiniLM-L6-v2 (22 M weights, 2 cores)
    one encoding takes 6 s (int8) to 36 s (codebooks), so pass only the codings worth trying.

    Args:
        model: the trained model; it needs a ``secateur_spec`` for a file-size limit.
        budget: the device's limits.
        example_inputs: one batch on the model's device; latency is timed at its batch size.
        score: ``model -> float`` for choosing between codings.
        calibration: batches for data criteria and BatchNorm recalibration.
        structured: criterion, scope, ``round_to``, ``max_ratio`` of the channel stage
            (default ``StructuredConfig(ratio=0)``; its ``ratio`` is ignored).
        weights: criterion and scope of the sparsity stage (default global magnitude).
        codings: value codings to try for a file-size limit.
        latency_runs: timed runs per latency probe (>= 20).
        shape_methods: how shape-bound limits may narrow the model: ``channels``, ``blocks``.
        recalibrate_bn: re-estimate each candidate's BatchNorm statistics before scoring it.
        metadata: the JSON metadata :func:`apply_plan` will store in the file; its header counts
            toward the file limit, so probes are encoded with it.

    Raises:
        ConfigError: a limit that no probe can meet (the message says what the furthest probes
            reached), unknown ``shape_methods``, no codings, a ``weights`` config with ``nm`` or
            ``per_layer`` or a ``structured`` one with ``per_layer`` (they fix what the search
            has to choose), or a file limit on a model without a spec.
    """
    structured = structured or StructuredConfig(ratio=0.0)
    weights = weights or UnstructuredConfig(sparsity=0.0)
    unknown = [m for m in shape_methods if m not in SHAPE_METHODS]
    if unknown or not shape_methods or len(set(shape_methods)) != len(shape_methods):
        raise ConfigError(
            f"shape_methods {list(shape_methods)!r}: name each of {', '.join(SHAPE_METHODS)} "
            "at most once, at least one"
        )
    if weights.nm is not None or weights.per_layer:
        raise ConfigError(
            "the planner chooses the sparsity itself: pass a weights config without nm or "
            "per_layer (criterion, scope and exclude are used)"
        )
    if structured.per_layer:
        raise ConfigError(
            "the planner chooses the structured ratio itself: pass a structured config without "
            "per_layer (criterion, scope, round_to, ignore and max_ratio are used)"
        )
    if budget.max_file_bytes is not None:
        check_spec(model, "a file-size budget")
        if not codings:
            raise ConfigError("codings is empty: pass at least one CompressionConfig")
    exact = CompressionConfig(values="exact")
    spec = getattr(model, "secateur_spec", None) is not None
    baseline = measure_figures(
        model,
        example_inputs,
        coding=exact if spec else None,
        latency_runs=latency_runs,
        score=float(score(model)),
        metadata=metadata,
    )
    baseline = dataclasses.replace(baseline, speedup=1.0)  # against itself, by definition
    probes: list[Probe] = []
    method, ratio, shapes = "none", 0.0, []
    narrowed = model
    limits = SHAPE_LIMITS
    if budget.shape_bound and not fits_limits(baseline, budget, limits):
        for candidate in shape_methods:
            found = _search_ratio(
                model, candidate, budget, structured, example_inputs, calibration, latency_runs,
                probes,
            )  # fmt: skip
            if found is None:
                continue
            fitted, pruned = found
            value = _score(pruned, score, calibration, recalibrate_bn)
            scored = dataclasses.replace(fitted.figures, score=value)
            shapes.append((dataclasses.replace(fitted, figures=scored), pruned))
        if not shapes:
            raise ConfigError(_out_of_reach(probes, budget, limits))
        best, narrowed = max(shapes, key=lambda pair: (pair[0].figures.score, -pair[0].setting))
        method, ratio = best.stage, best.setting
    shape_probes = tuple(p for p, _ in shapes)
    if budget.max_file_bytes is None:
        return Plan(
            budget, ratio, 0.0, exact, baseline, tuple(probes), (), structured, weights, method,
            shape_probes,
        )  # fmt: skip

    candidates = []
    with tempfile.TemporaryDirectory() as folder:
        for coding in codings:
            sparsity = _search_sparsity(
                narrowed, budget, weights, coding, example_inputs, calibration, probes, metadata
            )
            if sparsity is None:
                figures = probes[-1].figures
                candidates.append(Probe("weights", MAX_SPARSITY, coding.label, figures, False))
                continue
            pruned = copy.deepcopy(narrowed)
            if sparsity > 0:
                config = dataclasses.replace(weights, sparsity=sparsity)
                prune_(pruned, config, calibration=calibration).make_permanent()
            decoded = _decoded(pruned, coding, Path(folder), metadata)
            fitted = next(
                p
                for p in reversed(probes)
                if p.coding == coding.label and p.setting == sparsity and p.fits
            )
            figures = dataclasses.replace(
                measure_figures(
                    decoded,
                    example_inputs,
                    score=_score(decoded, score, calibration, recalibrate_bn),
                ),
                file_bytes=fitted.figures.file_bytes,  # the probe's encoding, not a re-encode
            )
            candidates.append(Probe("weights", sparsity, coding.label, figures, True))
    fitting = [(c, coding) for c, coding in zip(candidates, codings, strict=True) if c.fits]
    if not fitting:
        raise ConfigError(
            f"budget out of reach: no coding gets the file under {budget.max_file_bytes:,} bytes "
            f"even at {MAX_SPARSITY:.0%} sparsity (smallest: "
            f"{min(c.figures.file_bytes or 0 for c in candidates):,} bytes); raise "
            "max_file_bytes (--max-file-bytes) or add a smaller coding such as 3-bit codebooks "
            "(--codings codebook3)"
        )
    best_coding, coding = max(fitting, key=lambda pair: (pair[0].figures.score, -pair[0].setting))
    return Plan(
        budget,
        ratio,
        best_coding.setting,
        coding,
        baseline,
        tuple(probes),
        tuple(candidates),
        structured,
        weights,
        method,
        shape_probes,
    )
