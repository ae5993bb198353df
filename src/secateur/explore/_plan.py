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
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._config import check_int, check_range
from ..errors import ConfigError
from ..export import CompressionConfig, compressed_bytes, load_compressed, save_compressed
from ..measure import Latency, count_macs, count_params, measure_latencies
from ..pruning import DepthConfig, DepthResult, StructuredConfig, UnstructuredConfig, prune_
from ..quantization import CodebookConfig, cluster_weights_

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
#: The limits only a narrower model meets; ``min_*`` ones are lower bounds.
SHAPE_LIMITS = ("max_params", "max_macs", "max_latency_ms", "min_speedup")
#: How to narrow a model for shape-bound limits: remove channels, or whole residual blocks.
SHAPE_METHODS = ("channels", "blocks")
#: The highest block ratio tried (each stage keeps at least one block whatever the ratio).
MAX_BLOCK_RATIO = 0.95
_SPARSITY_STEPS = 10
MAX_SPARSITY = 0.99
#: Sparsity added per step when a recovered model's file comes out over the byte budget.
TIGHTEN_STEP = 0.005
#: A latency probe fits only this far under ``max_latency_ms``: timing on a shared machine
#: varies by a few percent between runs, and the final model is timed again.
LATENCY_MARGIN = 0.05


@dataclass(frozen=True)
class Budget:
    """Limits of a target device; ``None`` means no limit on that figure, at least one is set.

    ``max_file_bytes`` bounds the stored ``.secz`` file (storage-bound); ``max_params`` the
    parameters of the loaded, dense model (runtime weight memory: 4 bytes each in float32);
    ``max_macs`` the dense multiply-accumulates per sample and ``max_latency_ms`` the median
    latency on this machine at the example batch (compute-bound). ``min_speedup`` asks for the
    baseline's latency over the model's to be at least that, both timed in one interleaved loop:
    unlike an absolute time, that ratio holds when a shared machine speeds up or slows down.

    Raises:
        ConfigError: no limit, a limit that is not positive, or a speedup not above 1.
    """

    max_file_bytes: int | None = None
    max_params: int | None = None
    max_macs: int | None = None
    max_latency_ms: float | None = None
    min_speedup: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_params", "max_macs"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 1)
        if self.max_latency_ms is not None:
            check_range("max_latency_ms", self.max_latency_ms, 0.0, low_open=True)
        if self.min_speedup is not None:
            check_range("min_speedup", self.min_speedup, 1.0, low_open=True)
        if all(getattr(self, f) is None for f in self.limits()):
            raise ConfigError(
                "a budget needs at least one limit: max_file_bytes, max_params, max_macs, "
                "max_latency_ms or min_speedup"
            )

    @staticmethod
    def limits() -> tuple[str, ...]:
        return ("max_file_bytes", *SHAPE_LIMITS)

    @property
    def shape_bound(self) -> bool:
        """True when a limit needs a narrower model (parameters, MACs or latency)."""
        return any(getattr(self, limit) is not None for limit in SHAPE_LIMITS)

    @property
    def timed(self) -> bool:
        """True when a limit is on latency, absolute or relative."""
        return self.max_latency_ms is not None or self.min_speedup is not None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.limits()}


@dataclass(frozen=True)
class Figures:
    """What one model measured: score, parameters, dense MACs per sample, latency, the size of
    its ``.secz`` file, and its speedup (the baseline's latency over its own, timed in one
    loop); ``None`` where not measured."""

    score: float | None
    params: int
    nonzero_params: int
    macs: int
    latency: Latency | None
    file_bytes: int | None
    speedup: float | None = None

    def value(self, limit: str) -> float | None:
        """The figure a :class:`Budget` limit bounds."""
        return {
            "max_file_bytes": self.file_bytes,
            "max_params": self.params,
            "max_macs": self.macs,
            "max_latency_ms": None if self.latency is None else self.latency.median_ms,
            "min_speedup": self.speedup,
        }[limit]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _figures(
    model: nn.Module,
    example_inputs: Any,
    *,
    coding: CompressionConfig | None = None,
    latency_runs: int | None = None,
    score: float | None = None,
    metadata: dict[str, Any] | None = None,
    reference: nn.Module | None = None,
) -> Figures:
    """Count and time ``model``; with a ``reference``, time both in one loop for the speedup."""
    total, nonzero = count_params(model)
    latency = speedup = None
    if latency_runs is not None:
        if reference is None:
            latency = measure_latencies([model], example_inputs, runs=latency_runs)[0]
        else:
            ref, latency = measure_latencies([reference, model], example_inputs, runs=latency_runs)
            speedup = ref.median_ms / latency.median_ms
    size = None if coding is None else len(compressed_bytes(model, coding, metadata=metadata))
    macs = count_macs(model, example_inputs).dense
    return Figures(score, total, nonzero, macs, latency, size, speedup)


def _bound(budget: Budget, limit: str) -> float | None:
    """The value a probe must not pass: the limit, with the timing margin for latency."""
    bound = getattr(budget, limit)
    if bound is not None and limit == "max_latency_ms":
        return bound * (1.0 - LATENCY_MARGIN)
    if bound is not None and limit == "min_speedup":
        return bound * (1.0 + LATENCY_MARGIN)
    return bound


def _number(limit: str, value: float) -> str:
    """A figure as the messages show it: milliseconds to 4 digits, counts in full."""
    if limit == "min_speedup":
        return f"{value:.3g}x"
    return f"{value:.4g}" if limit == "max_latency_ms" else f"{int(value):,}"


def _misses(limit: str, value: float | None, bound: float) -> bool:
    if value is None:
        return True
    return value < bound if limit.startswith("min_") else value > bound


def _excess(figures: Figures, budget: Budget, limits: Sequence[str]) -> list[str]:
    """``"macs 120,000 > 100,000"`` for each limit the figures miss."""
    out = []
    for limit in limits:
        bound, value = _bound(budget, limit), figures.value(limit)
        if bound is not None and _misses(limit, value, bound):
            shown = "not measured" if value is None else _number(limit, value)
            timed = limit in ("max_latency_ms", "min_speedup")
            side = "less" if limit.startswith("max_") else "plus"
            margin = (
                f" (the limit {getattr(budget, limit):g} {side} the {LATENCY_MARGIN:.0%} timing "
                "margin)"
                if timed
                else ""
            )
            sign = "<" if limit.startswith("min_") else ">"
            name = limit.removeprefix("max_").removeprefix("min_")
            out.append(f"{name} {shown} {sign} {_number(limit, bound)}{margin}")
    return out


def _fits(figures: Figures, budget: Budget, limits: Sequence[str]) -> bool:
    return not _excess(figures, budget, limits)


def _check_spec(model: nn.Module, why: str) -> None:
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


def _narrow_(
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
            excess = ", ".join(_excess(mine[0].figures, budget, limits))
            tops.append(f"{method} at ratio {mine[0].setting:g}: {excess}")
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
) -> float | None:
    """Smallest ratio of ``method`` (``channels`` or ``blocks``) whose pruned copy meets the
    shape-bound limits, by bisection; ``None`` if even the highest ratio does not, or the model
    has no block to remove."""
    limits = SHAPE_LIMITS
    timed = latency_runs if budget.timed else None
    reference = model if budget.min_speedup is not None else None

    def probe(ratio: float) -> bool | None:
        pruned = copy.deepcopy(model)
        if not _narrow_(pruned, method, ratio, structured, example_inputs, calibration):
            return None
        figures = _figures(pruned, example_inputs, latency_runs=timed, reference=reference)
        fits = _fits(figures, budget, limits)
        probes.append(Probe(method, ratio, None, figures, fits))
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
    return high


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
        figures = _figures(pruned, example_inputs, coding=coding, metadata=metadata)
        fits = _fits(figures, budget, ("max_file_bytes",))
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
    (higher is better; use held-out data) and keeps the best. No recovery runs here: candidates
    are compared one-shot, and :func:`apply_plan` recovers the chosen one.

    Cost: every probe of a file limit encodes the whole model, about 13 times per coding. That is
    instant for the zoo's models, but at the scale of all-MiniLM-L6-v2 (22 M weights, 2 cores)
    one encoding takes 6 s (int8) to 36 s (codebooks), so pass only the codings worth trying.

    Args:
        model: the trained model; it needs a ``secateur_spec`` for a file-size limit.
        budget: the device's limits.
        example_inputs: one batch on the model's device; latency is timed at its batch size.
        score: ``model -> float`` for choosing between codings.
        calibration: batches for data criteria.
        structured: criterion, scope, ``round_to``, ``max_ratio`` of the channel stage
            (default ``StructuredConfig(ratio=0)``; its ``ratio`` is ignored).
        weights: criterion and scope of the sparsity stage (default global magnitude).
        codings: value codings to try for a file-size limit.
        latency_runs: timed runs per latency probe (>= 20).
        shape_methods: how shape-bound limits may narrow the model: ``channels``, ``blocks``.
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
        _check_spec(model, "a file-size budget")
        if not codings:
            raise ConfigError("codings is empty: pass at least one CompressionConfig")
    exact = CompressionConfig(values="exact")
    spec = getattr(model, "secateur_spec", None) is not None
    baseline = _figures(
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
    if budget.shape_bound and not _fits(baseline, budget, limits):
        for candidate in shape_methods:
            found = _search_ratio(
                model, candidate, budget, structured, example_inputs, calibration, latency_runs,
                probes,
            )  # fmt: skip
            if found is None:
                continue
            pruned = copy.deepcopy(model)
            _narrow_(pruned, candidate, found, structured, example_inputs, calibration)
            fitted = next(
                p for p in reversed(probes) if p.stage == candidate and p.setting == found
            )
            scored = dataclasses.replace(fitted.figures, score=float(score(pruned)))
            shapes.append((Probe(candidate, found, None, scored, True), pruned))
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
                _figures(decoded, example_inputs, score=float(score(decoded))),
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


@dataclass(frozen=True)
class PlanOutcome:
    """The planned model, recovered, written to ``path`` and reloaded from it (``model``).

    ``figures`` were measured on the reloaded model (``score`` by the caller's function,
    latency timed interleaved with the baseline, whose time is ``baseline_latency``); ``met``
    says for each set limit whether its figure is within it. ``sparsity`` is the final global
    sparsity target: above the plan's when recovery grew the file and it was tightened.
    """

    model: nn.Module
    path: Path
    figures: Figures
    baseline_latency: Latency
    met: dict[str, bool]
    sparsity: float


def apply_plan(
    model: nn.Module,
    plan: Plan,
    path: str | os.PathLike[str],
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    score: Score,
    recover: Recover | None = None,
    calibration: Any = None,
    latency_runs: int = 50,
    metadata: dict[str, Any] | None = None,
) -> PlanOutcome:
    """Carry ``plan`` out on a copy of ``model`` and write the result to ``path`` once.

    Structured pruning, then ``recover(m, None)``; weight pruning, then ``recover(m, masks)``;
    for a codebook coding, k-means clustering, then ``recover(m, codebooks)`` (centroid
    fine-tuning). If the encoded file is then over the byte budget (recovery moves the values),
    :data:`TIGHTEN_STEP` more of the weights are zeroed at a time until it fits (or
    :data:`MAX_SPARSITY` is reached), the weight stages are recovered once more at that
    sparsity, and, should the file have grown again, zeroed further without recovery. The file
    is written atomically, reloaded and measured; ``met`` tells which limits its figures meet. Pass the ``metadata`` that
    :func:`plan_for_budget` was given, so the header the probes counted is the one written.

    Raises:
        ConfigError: ``path`` does not end in ``.secz`` or the model has no spec (checked
            before any work).
        OutputError: the folder cannot be written.
    """
    target = Path(path)
    if target.suffix != ".secz":
        raise ConfigError(f"cannot write the planned model to {target}: name the file .secz")
    _check_spec(model, "apply_plan")
    pruned = copy.deepcopy(model)
    if plan.ratio > 0:
        _narrow_(
            pruned, plan.shape_method, plan.ratio, plan.structured, example_inputs, calibration
        )
        if recover is not None:
            recover(pruned, None)
    limit = plan.budget.max_file_bytes

    def over() -> bool:
        if limit is None:
            return False
        return len(compressed_bytes(pruned, plan.coding, metadata=metadata)) > limit

    def recover_weights(sparsity: float) -> None:
        """Weight pruning at ``sparsity`` with recovery under its masks, then codebooks."""
        if sparsity > 0:
            config = dataclasses.replace(plan.weights, sparsity=sparsity)
            masks = prune_(pruned, config, calibration=calibration)
            if recover is not None:
                recover(pruned, masks)
            masks.make_permanent()
        if plan.coding.values.value == "codebook" and recover is not None:
            books = cluster_weights_(
                pruned, CodebookConfig(bits=plan.coding.bits, per_layer=plan.coding.per_layer)
            )
            recover(pruned, books)

    def tighten(sparsity: float) -> float:
        """Zero more weights, no recovery, until the file fits; return the sparsity reached."""
        while over() and sparsity < MAX_SPARSITY:
            sparsity = min(MAX_SPARSITY, math.floor((sparsity + TIGHTEN_STEP) * 1000) / 1000)
            config = dataclasses.replace(plan.weights, sparsity=sparsity)
            prune_(pruned, config, calibration=calibration).make_permanent()
        return sparsity

    sparsity = plan.sparsity
    recover_weights(sparsity)
    if over():
        sparsity = tighten(sparsity)
        if recover is not None:  # one more recovery at the tightened sparsity, then re-check
            recover_weights(sparsity)
            sparsity = tighten(sparsity)
    save_compressed(pruned, target, plan.coding, metadata=metadata)
    device = next(model.parameters()).device
    restored = load_compressed(target, device=str(device)).model
    base_latency, latency = measure_latencies([model, restored], example_inputs, runs=latency_runs)
    total, nonzero = count_params(restored)
    figures = Figures(
        float(score(restored)),
        total,
        nonzero,
        count_macs(restored, example_inputs).dense,
        latency,
        target.stat().st_size,
        base_latency.median_ms / latency.median_ms,
    )
    met = {
        limit: not _misses(limit, figures.value(limit), getattr(plan.budget, limit))
        for limit in Budget.limits()
        if getattr(plan.budget, limit) is not None
    }
    return PlanOutcome(restored, target, figures, base_latency, met, sparsity)
