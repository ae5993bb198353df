"""What a device budget is, what a model measures against it, and which limits it misses.

Shared by the planner's search (:mod:`._plan`) and its execution (:mod:`._apply_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._config import check_int, check_range
from ..errors import ConfigError
from ..export import CompressionConfig, compressed_bytes
from ..measure import Latency, count_macs, count_params, measure_latencies

#: The limits only a narrower model meets; ``min_*`` ones are lower bounds.
SHAPE_LIMITS = ("max_params", "max_macs", "max_latency_ms", "min_speedup")
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


def measure_figures(
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


def limit_bound(budget: Budget, limit: str) -> float | None:
    """The value a probe must not pass: the limit, with the timing margin for latency."""
    bound = getattr(budget, limit)
    if bound is not None and limit == "max_latency_ms":
        return bound * (1.0 - LATENCY_MARGIN)
    if bound is not None and limit == "min_speedup":
        return bound * (1.0 + LATENCY_MARGIN)
    return bound


def shown_number(limit: str, value: float) -> str:
    """A figure as the messages show it: milliseconds to 4 digits, counts in full."""
    if limit == "min_speedup":
        return f"{value:.3g}x"
    return f"{value:.4g}" if limit == "max_latency_ms" else f"{int(value):,}"


def misses(limit: str, value: float | None, bound: float) -> bool:
    if value is None:
        return True
    return value < bound if limit.startswith("min_") else value > bound


def excess(figures: Figures, budget: Budget, limits: Sequence[str]) -> list[str]:
    """``"macs 120,000 > 100,000"`` for each limit the figures miss."""
    out = []
    for limit in limits:
        bound, value = limit_bound(budget, limit), figures.value(limit)
        if bound is not None and misses(limit, value, bound):
            shown = "not measured" if value is None else shown_number(limit, value)
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
            out.append(f"{name} {shown} {sign} {shown_number(limit, bound)}{margin}")
    return out


def fits_limits(figures: Figures, budget: Budget, limits: Sequence[str]) -> bool:
    return not excess(figures, budget, limits)
