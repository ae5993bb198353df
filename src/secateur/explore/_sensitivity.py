"""Sensitivity analysis: how much the score falls when one layer (or one channel group) alone is
pruned, at each of several ratios.

Unstructured: for every prunable weight, the lowest-scoring fraction ``r`` of that layer alone is
zeroed, the model is scored, and the weight is copied back bit for bit (one clone per layer, no
copy of the model). Structured: for every channel group of the dependency graph, a deep copy of
the model loses ``r`` of that group's units alone, is scored and discarded.

Each point records the score, the drop from the baseline (``baseline - score``, so a positive
drop is a loss when higher scores are better) and the cost it saves: weights zeroed
(unstructured) or dense MACs per sample removed (structured, counted by
:func:`secateur.measure.count_macs` on the pruned copy).
"""

from __future__ import annotations

import bisect
import copy
import enum
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._config import check_range, coerce_enum
from .._progress import make_progress
from ..errors import ConfigError
from ..graph import KINDS, Group, build_dependency_graph
from ..importance import create_criterion, group_scores, weight_scores
from ..measure import count_macs
from ..pruning import StructuredConfig, UnstructuredConfig, prunable_weights
from ..pruning._structured import remove_lowest_
from ..pruning._unstructured import lowest_k_mask

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FORMAT_VERSION = 1


class SensitivityMethod(str, enum.Enum):
    """What one scanned point prunes: single weights of one layer, or units of one group."""

    UNSTRUCTURED = "unstructured"
    STRUCTURED = "structured"


#: What ``LayerCurve.cost_saved`` and ``SensitivityResult.total_cost`` count, per method.
COST_UNITS = {SensitivityMethod.UNSTRUCTURED: "weights", SensitivityMethod.STRUCTURED: "MACs"}


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """``ratios`` as a tuple of floats, strictly increasing, each in [0, 1).

    Raises:
        ConfigError: empty, unsorted, repeated or out-of-range ratios.
    """
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise ConfigError(f"ratios={ratios!r} must be a non-empty list such as [0.1, 0.5, 0.9]")
    for r in ratios:
        check_range("ratios", r, 0.0, 1.0, high_open=True)
    out = tuple(float(r) for r in ratios)
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(
            f"ratios={list(out)} must be strictly increasing with no repeats, e.g. [0.1, 0.5, 0.9]"
        )
    return out


@dataclass(frozen=True)
class LayerCurve:
    """The scan of one layer (unstructured) or one group (structured).

    Attributes:
        name: the module name (unstructured) or the group's first producer (structured): an
            exact ``per_layer`` pattern for ``UnstructuredConfig`` / ``StructuredConfig``.
        kind: ``weights`` (unstructured), or the group kind ``channel``/``head``/``hidden``.
        size: weights in the layer, or units (channels, neurons, heads) in the group(s).
        scores: the score at each scanned ratio.
        drops: ``baseline - score`` at each scanned ratio.
        cost_saved: weights zeroed, or dense MACs per sample removed, at each scanned ratio.
    """

    name: str
    kind: str
    size: int
    scores: tuple[float, ...]
    drops: tuple[float, ...]
    cost_saved: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        object.__setattr__(self, "drops", tuple(float(d) for d in self.drops))
        object.__setattr__(self, "cost_saved", tuple(int(c) for c in self.cost_saved))
        if not len(self.scores) == len(self.drops) == len(self.cost_saved):
            raise ConfigError(
                f"layer {self.name}: scores, drops and cost_saved must have one entry per ratio"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "scores": list(self.scores),
            "drops": list(self.drops),
            "cost_saved": list(self.cost_saved),
        }


@dataclass(frozen=True)
class SensitivityResult:
    """What :func:`sensitivity_scan` measured: a value, saved as JSON with :meth:`to_dict`.

    Attributes:
        method: ``unstructured`` or ``structured``.
        criterion: the importance criterion that chose what to prune.
        baseline: the score of the unpruned model.
        ratios: the scanned ratios, strictly increasing, in [0, 1).
        layers: one :class:`LayerCurve` per scanned layer or group, in model order.
        total_cost: all scanned weights (unstructured) or the unpruned model's dense MACs per
            sample (structured): what a global target is a fraction of.
        score_label: what the score is, for tables and plots (e.g. ``validation accuracy``).

    Between scanned ratios, :meth:`drop` and :meth:`cost` interpolate linearly; ratio 0 is
    taken as (drop 0, cost 0) unless it was scanned.

    Raises:
        ConfigError: inconsistent lengths, unsorted ratios or repeated names.
    """

    method: SensitivityMethod
    criterion: str
    baseline: float
    ratios: tuple[float, ...]
    layers: tuple[LayerCurve, ...]
    total_cost: int
    score_label: str = "score"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", coerce_enum("method", SensitivityMethod, self.method))
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "baseline", float(self.baseline))
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError("layer names in a sensitivity result must be unique")
        for layer in self.layers:
            if len(layer.scores) != len(self.ratios):
                raise ConfigError(
                    f"layer {layer.name} has {len(layer.scores)} points for {len(self.ratios)} ratios"
                )

    @property
    def cost_unit(self) -> str:
        """``weights`` or ``MACs``: what ``cost_saved`` and ``total_cost`` count."""
        return COST_UNITS[self.method]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerCurve:
        """The curve of ``name``. Raises ConfigError for a name that was not scanned."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ConfigError(f"'{name}' was not scanned: choose one of {', '.join(self.names)}")

    def drop(self, name: str, ratio: float) -> float:
        """Score drop of ``name`` pruned alone at ``ratio`` (measured at a scanned ratio,
        linearly interpolated between them).

        Raises:
            ConfigError: unknown name, or ``ratio`` outside ``[0, max(ratios)]``.
        """
        return interpolate(self.ratios, self.layer(name).drops, self._check(ratio))

    def cost(self, name: str, ratio: float) -> float:
        """Weights or MACs saved by pruning ``name`` alone at ``ratio`` (interpolated)."""
        return interpolate(self.ratios, self.layer(name).cost_saved, self._check(ratio))

    def _check(self, ratio: float) -> float:
        check_range("ratio", ratio, 0.0, 1.0, high_open=True)
        if ratio > self.ratios[-1] + 1e-12:
            raise ConfigError(
                f"ratio={ratio} is beyond the largest scanned ratio {self.ratios[-1]}: "
                "scan up to it or ask for less"
            )
        return float(ratio)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` rebuilds an equal value."""
        return {
            "format": "secateur-sensitivity",
            "version": FORMAT_VERSION,
            "method": self.method.value,
            "criterion": self.criterion,
            "baseline": self.baseline,
            "ratios": list(self.ratios),
            "cost_unit": self.cost_unit,
            "total_cost": self.total_cost,
            "score_label": self.score_label,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> SensitivityResult:
        """Rebuild a result from :meth:`to_dict`'s output.

        Raises:
            ConfigError: not a sensitivity dict, a newer format, or missing/bad fields.
        """
        if not isinstance(data, dict) or data.get("format") != "secateur-sensitivity":
            raise ConfigError("not a secateur sensitivity result: pass what to_dict() wrote")
        if data.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"sensitivity format version {data.get('version')!r} is not supported: "
                f"this secateur reads version {FORMAT_VERSION}"
            )
        try:
            layers = tuple(
                LayerCurve(
                    name=str(d["name"]),
                    kind=str(d["kind"]),
                    size=int(d["size"]),
                    scores=tuple(d["scores"]),
                    drops=tuple(d["drops"]),
                    cost_saved=tuple(d["cost_saved"]),
                )
                for d in data["layers"]
            )
            return cls(
                method=data["method"],
                criterion=str(data["criterion"]),
                baseline=float(data["baseline"]),
                ratios=tuple(data["ratios"]),
                layers=layers,
                total_cost=int(data["total_cost"]),
                score_label=str(data.get("score_label", "score")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"sensitivity result is missing or has a bad field ({exc}): pass what to_dict() wrote"
            ) from None


def interpolate(ratios: Sequence[float], values: Sequence[float], ratio: float) -> float:
    """Piecewise-linear ``values`` at ``ratio``, through ``(0, 0)`` when 0 was not scanned.

    ``ratio`` must lie in ``[0, ratios[-1]]`` (callers check).
    """
    xs, ys = list(ratios), [float(v) for v in values]
    if xs[0] > 0.0:
        xs, ys = [0.0, *xs], [0.0, *ys]
    if ratio >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, ratio) - 1
    if xs[i] == ratio:
        return ys[i]
    t = (ratio - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


def _score(score_fn: Callable[[nn.Module], float], model: nn.Module, where: str) -> float:
    value = score_fn(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"score_fn returned {value!r} {where}: it must return a finite number, higher is "
            "better (e.g. validation accuracy)"
        )
    return float(value)


def sensitivity_scan(
    model: nn.Module,
    score_fn: Callable[[nn.Module], float],
    *,
    method: SensitivityMethod | str = SensitivityMethod.UNSTRUCTURED,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    criterion: str = "magnitude",
    example_inputs: Any = None,
    calibration: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    exclude: Sequence[str] = (),
    kinds: Sequence[str] = KINDS,
    score_label: str = "score",
    progress: bool = True,
) -> SensitivityResult:
    """Prune each layer (or channel group) alone at each ratio and score the model.

    Args:
        model: a trained model; it is left exactly as it was (unstructured: each weight is
            copied back bit for bit after its points; structured: only deep copies are cut).
        score_fn: ``score_fn(model) -> float``, higher is better (e.g. validation accuracy);
            called once for the baseline and once per (layer, ratio) point.
        method: ``unstructured`` (zero single weights of one layer) or ``structured`` (remove
            units of one channel group; needs ``example_inputs``).
        ratios: fractions in [0, 1), strictly increasing: of the layer's weights, or of the
            group's units.
        criterion: importance criterion choosing what goes (``importance.list_criteria()``).
        example_inputs: structured only: inputs to trace the model and count MACs on.
        calibration, loss_fn: for data-driven criteria, passed on to ``unstructured_masks`` /
            ``prune_structured_`` (see :func:`secateur._calibration.iter_calibration`). Such a
            criterion gathers its statistics once, on the unpruned model, since every point
            starts from it.
        exclude: fnmatch patterns of module names to leave out of the scan.
        kinds: structured only: the group kinds to scan (``channel``, ``head``, ``hidden``).
        score_label: what the score is, for tables and plots.
        progress: show a progress bar over all (layer, ratio) points.

    Returns:
        A :class:`SensitivityResult` with one curve per layer (unstructured: the module name;
        structured: the group's first producer; groups sharing that producer are scanned
        together, since a ``per_layer`` pattern would select them together).

    Raises:
        ConfigError: bad ratios/method/criterion, structured without ``example_inputs``,
            nothing to scan, or a score that is not a finite number.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(32, 4)
        >>> ref = net(x).detach()
        >>> score = lambda m: -float((m(x).detach() - ref).pow(2).mean())
        >>> res = sensitivity_scan(net, score, ratios=(0.5,), progress=False)
        >>> res.names, res.layers[0].cost_saved
        (('0', '2'), (16,))
    """
    if not callable(score_fn):
        raise ConfigError("score_fn must be a callable score_fn(model) -> float")
    method = coerce_enum("method", SensitivityMethod, method)
    ratios = check_ratios(ratios)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(
            f"kinds={list(kinds)} is not valid: choose one or more of {', '.join(KINDS)}"
        )
    UnstructuredConfig(sparsity=0.0, criterion=criterion)  # validates the name before any work
    structured = method is SensitivityMethod.STRUCTURED
    if structured and example_inputs is None:
        raise ConfigError(
            "a structured sensitivity scan needs example_inputs: pass example_inputs=x"
        )
    baseline = _score(score_fn, model, "for the unpruned model")
    extra = {"calibration": calibration, "loss_fn": loss_fn}
    if not structured:
        layers, total = _scan_unstructured(
            model, score_fn, baseline, ratios, criterion, exclude, extra, progress
        )
    else:
        layers, total = _scan_structured(
            model,
            score_fn,
            baseline,
            ratios,
            criterion,
            example_inputs,
            exclude,
            kinds,
            extra,
            progress,
        )
    return SensitivityResult(
        method=method,
        criterion=criterion,
        baseline=baseline,
        ratios=ratios,
        layers=tuple(layers),
        total_cost=total,
        score_label=score_label,
    )


def _scan_unstructured(
    model: nn.Module,
    score_fn: Callable[[nn.Module], float],
    baseline: float,
    ratios: tuple[float, ...],
    criterion: str,
    exclude: tuple[str, ...],
    extra: dict[str, Any],
    progress: bool,
) -> tuple[list[LayerCurve], int]:
    weights = prunable_weights(model, exclude)
    if not weights:
        raise ConfigError("no Linear or Conv weights to scan: check the model and `exclude`")
    # Each point starts from the unpruned model, so every layer's scores are the same at every
    # ratio: score all layers once (one calibration pass for data criteria), then cut.
    ranked = weight_scores(model, create_criterion(criterion), weights, **extra)
    curves = []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("sensitivity", total=len(weights) * len(ratios), status="")
        for param_name in weights:
            module_name = param_name.removesuffix(".weight")
            weight = model.get_parameter(param_name)
            saved = weight.detach().clone()
            scores, removed = [], []
            bar.update(task, status=module_name)
            try:
                for ratio in ratios:
                    keep = lowest_k_mask(ranked[param_name], round(ratio * weight.numel()))
                    with torch.no_grad():
                        weight.masked_fill_(~keep.to(weight.device), 0.0)
                    scores.append(_score(score_fn, model, f"with {module_name} pruned at {ratio}"))
                    removed.append(int((~keep).sum()))
                    with torch.no_grad():
                        weight.copy_(saved)
                    bar.advance(task)
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
            curves.append(
                LayerCurve(
                    name=module_name,
                    kind="weights",
                    size=weight.numel(),
                    scores=tuple(scores),
                    drops=tuple(baseline - s for s in scores),
                    cost_saved=tuple(removed),
                )
            )
    return curves, sum(c.size for c in curves)


def _escape(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _excluded(group: Group, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in group.module_names() for p in patterns)


def _structured_config(
    ratio: float, pattern: str, criterion: str, exclude: tuple[str, ...], kinds: tuple[str, ...]
) -> StructuredConfig:
    """Prune only the groups ``pattern`` selects, at ``ratio``; every other group stays whole."""
    return StructuredConfig(
        ratio=0.0,
        per_layer={pattern: ratio},
        ignore=exclude,
        kinds=kinds,
        criterion=criterion,
        scope="layer",
    )


def _scan_structured(
    model: nn.Module,
    score_fn: Callable[[nn.Module], float],
    baseline: float,
    ratios: tuple[float, ...],
    criterion: str,
    example_inputs: Any,
    exclude: tuple[str, ...],
    kinds: tuple[str, ...],
    extra: dict[str, Any],
    progress: bool,
) -> tuple[list[LayerCurve], int]:
    graph = build_dependency_graph(model, example_inputs)
    eligible = [g for g in graph.groups if g.kind in kinds and not _excluded(g, exclude)]
    if not eligible:
        raise ConfigError(
            "no prunable channel groups to scan: check the model, `exclude` and `kinds`"
        )
    # One entry per first producer: per_layer={name: r} selects every group this name
    # produces (a fused qkv projection writes several), so they are scanned together.
    entries: dict[str, list[Group]] = {}
    for group in eligible:
        name = group.producers()[0]
        if name not in entries:
            key = _escape(name)
            entries[name] = [
                g for g in eligible if any(fnmatch.fnmatchcase(p, key) for p in g.producers())
            ]
    # Score every group once on the unpruned model; each point cuts a fresh copy by these scores.
    unit_scores = dict(
        zip(
            map(id, eligible),
            group_scores(model, eligible, create_criterion(criterion), **extra),
            strict=True,
        )
    )
    dense = count_macs(model, example_inputs).dense
    curves = []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("sensitivity", total=len(entries) * len(ratios), status="")
        for name, groups in entries.items():
            bar.update(task, status=name)
            scores, saved = [], []
            for ratio in ratios:
                pruned = copy.deepcopy(model)
                config = _structured_config(ratio, _escape(name), criterion, exclude, kinds)
                remove_lowest_(
                    pruned,
                    graph,
                    groups,
                    [unit_scores[id(g)] for g in groups],
                    config,
                    example_inputs,
                )
                scores.append(_score(score_fn, pruned, f"with {name} pruned at {ratio}"))
                saved.append(dense - count_macs(pruned, example_inputs).dense)
                del pruned
                bar.advance(task)
            kind = "+".join(sorted({g.kind for g in groups}))
            curves.append(
                LayerCurve(
                    name=name,
                    kind=kind,
                    size=sum(g.size for g in groups),
                    scores=tuple(scores),
                    drops=tuple(baseline - s for s in scores),
                    cost_saved=tuple(saved),
                )
            )
    return curves, dense
