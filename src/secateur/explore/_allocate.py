"""Per-layer pruning ratios from a sensitivity scan: meet a global target at the least predicted
cost in score.

The prediction is first order: the drop of a combination is taken as that of each layer pruned
alone, and savings add up across layers. For a tolerance ``tau`` every layer takes the largest
ratio whose measured drop stays within ``tau`` (the robust layers go furthest); ``tau`` is
bisected to the smallest value at which the summed savings meet the target. Drops and savings
are linear between scanned ratios, through (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._config import check_range
from ..errors import ConfigError
from ._sensitivity import LayerCurve, SensitivityMethod, SensitivityResult, interpolate

_BISECTIONS = 200


@dataclass(frozen=True)
class _Curve:
    """One layer's knots up to the ratio cap: ``env`` is the running maximum of the drop, so a
    ratio is allowed only if no smaller ratio dropped more (noise never lets a layer jump past a
    bad point); ``cost`` is made non-decreasing the same way."""

    name: str
    rs: tuple[float, ...]
    env: tuple[float, ...]
    cost: tuple[float, ...]

    def ratio_at(self, tau: float) -> float:
        """Largest ratio in ``[0, cap]`` whose (enveloped) drop is at most ``tau``."""
        if self.env[0] > tau:
            return 0.0
        k = max(i for i, e in enumerate(self.env) if e <= tau)
        if k == len(self.rs) - 1:
            return self.rs[-1]
        lo, hi = self.env[k], self.env[k + 1]
        t = (tau - lo) / (hi - lo)  # hi > tau >= lo, so hi > lo
        return self.rs[k] + t * (self.rs[k + 1] - self.rs[k])

    def cost_at(self, ratio: float) -> float:
        return interpolate(self.rs, self.cost, ratio) if ratio > 0 else 0.0


def _running_max(values: list[float]) -> tuple[float, ...]:
    out, best = [], -math.inf
    for v in values:
        best = max(best, v)
        out.append(best)
    return tuple(out)


def _curve(result: SensitivityResult, layer: LayerCurve, cap: float) -> _Curve:
    rs = [0.0] + [r for r in result.ratios if 0.0 < r <= cap]
    if rs[-1] < cap:
        rs.append(cap)
    drops = [interpolate(result.ratios, layer.drops, r) for r in rs]
    costs = [interpolate(result.ratios, layer.cost_saved, r) for r in rs]
    return _Curve(layer.name, tuple(rs), _running_max(drops), _running_max(costs))


def _needed(
    result: SensitivityResult,
    target_sparsity: float | None,
    target_macs_reduction: float | None,
) -> tuple[float, str]:
    """Cost to save for the target, and the target's name as the user wrote it."""
    if (target_sparsity is None) == (target_macs_reduction is None):
        raise ConfigError("pass exactly one of target_sparsity or target_macs_reduction")
    if target_sparsity is not None:
        check_range("target_sparsity", target_sparsity, 0.0, 1.0, high_open=True)
        if result.method is not SensitivityMethod.UNSTRUCTURED:
            raise ConfigError(
                "target_sparsity needs an unstructured scan (it counts weights): scan with "
                "method='unstructured' or pass target_macs_reduction"
            )
        return target_sparsity * result.total_cost, "target_sparsity"
    check_range("target_macs_reduction", target_macs_reduction, 1.0)
    if result.method is not SensitivityMethod.STRUCTURED:
        raise ConfigError(
            "target_macs_reduction needs a structured scan (zeroed weights save no dense MACs): "
            "scan with method='structured' or pass target_sparsity"
        )
    return result.total_cost * (1.0 - 1.0 / target_macs_reduction), "target_macs_reduction"


def predicted_savings(result: SensitivityResult, ratios: dict[str, float]) -> float:
    """What ``ratios`` achieve by the scan's first-order prediction: the fraction of scanned
    weights removed (unstructured) or the MAC reduction factor (structured, e.g. 2.0).

    Raises:
        ConfigError: a name that was not scanned or a ratio beyond the scanned range.
    """
    saved = sum(result.cost(name, r) for name, r in ratios.items())
    if result.method is SensitivityMethod.UNSTRUCTURED:
        return saved / result.total_cost if result.total_cost else 0.0
    left = result.total_cost - saved
    return result.total_cost / left if left > 0 else math.inf


def predicted_drop(result: SensitivityResult, ratios: dict[str, float]) -> float:
    """Sum of the single-layer drops at ``ratios``: a first-order estimate of the drop of the
    model pruned with all of them at once (not a measurement)."""
    return sum(result.drop(name, r) for name, r in ratios.items())


def allocate_ratios(
    result: SensitivityResult,
    *,
    target_sparsity: float | None = None,
    target_macs_reduction: float | None = None,
    max_ratio: float = 0.95,
) -> dict[str, float]:
    """Per-layer ratios that meet a global target while keeping the predicted drop smallest.

    Args:
        result: an unstructured scan for ``target_sparsity``, a structured one for
            ``target_macs_reduction``.
        target_sparsity: fraction in [0, 1) of all scanned weights to remove.
        target_macs_reduction: factor >= 1 by which dense MACs should fall (2.0: half of them).
        max_ratio: no layer goes beyond this ratio (nor beyond the largest scanned ratio).

    Returns:
        ``{name: ratio}`` for every scanned layer (0.0 for those left whole), usable directly as
        ``per_layer=`` of ``UnstructuredConfig``/``StructuredConfig``: the names are exact module
        names (unstructured) or group producers (structured). Ratios are rounded up to 6
        decimals, so the predicted savings meet the target.

    Raises:
        ConfigError: both or neither target, a target that does not fit the scan's method, or a
            target beyond what ``max_ratio`` allows (the message says the reachable maximum).

    Example:
        >>> robust = LayerCurve("a", "weights", 100, (1.0, 0.5), (0.0, 0.5), (50, 90))
        >>> fragile = LayerCurve("b", "weights", 100, (0.9, 0.2), (0.1, 0.8), (50, 90))
        >>> scan = SensitivityResult("unstructured", "magnitude", 1.0, (0.5, 0.9),
        ...                          (robust, fragile), total_cost=200)
        >>> allocate_ratios(scan, target_sparsity=0.5)
        {'a': 0.568966, 'b': 0.431035}
    """
    needed, target_name = _needed(result, target_sparsity, target_macs_reduction)
    check_range("max_ratio", max_ratio, 0.0, 1.0, low_open=True, high_open=True)
    cap = min(max_ratio, result.ratios[-1])
    curves = [_curve(result, layer, cap) for layer in result.layers]
    reachable = sum(c.cost[-1] for c in curves)
    if needed > reachable * (1 + 1e-12):
        best = predicted_savings(result, {c.name: cap for c in curves})
        target = target_sparsity if target_sparsity is not None else target_macs_reduction
        raise ConfigError(
            f"{target_name}={target} cannot be reached with ratios up to {cap:g} "
            f"(max_ratio={max_ratio:g}, largest scanned ratio {result.ratios[-1]:g}): the "
            f"reachable maximum is {best:.4g}; lower the target, raise max_ratio or scan "
            "larger ratios"
        )
    if needed <= 0:
        return {c.name: 0.0 for c in curves}

    def total(ratios: list[float]) -> float:
        return sum(c.cost_at(r) for c, r in zip(curves, ratios, strict=True))

    def at(tau: float) -> list[float]:
        return [c.ratio_at(tau) for c in curves]

    lo = min(c.env[0] for c in curves) - 1.0  # every layer at 0: saves nothing
    hi = max(c.env[-1] for c in curves)  # every layer at the cap: enough, checked above
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if total(at(mid)) >= needed:
            hi = mid
        else:
            lo = mid
    # Layers on a flat stretch of their curve all jump at the same tau; move them together
    # only as far as the target needs (their drop stays within tau throughout).
    low, high = at(lo), at(hi)
    t_lo, t_hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = (t_lo + t_hi) / 2
        if mid in (t_lo, t_hi):
            break
        if total([a + mid * (b - a) for a, b in zip(low, high, strict=True)]) >= needed:
            t_hi = mid
        else:
            t_lo = mid
    chosen = [a + t_hi * (b - a) for a, b in zip(low, high, strict=True)]
    # up to the next 1e-6 (so the target stays met), ignoring float dust below 1e-12
    return {
        c.name: min(cap, math.ceil(r * 1e6 - 1e-6) / 1e6)
        for c, r in zip(curves, chosen, strict=True)
    }
