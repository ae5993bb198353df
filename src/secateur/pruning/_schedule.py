"""Pruning schedules: one-shot, iterative (prune → recover, repeated) and gradual (AGP).

* :func:`agp_sparsity` is the cubic schedule of Zhu & Gupta, "To prune, or not to prune" (2017).
* :class:`GradualPruner` applies it during training as an ``OptimizerConstraint``: masks are
  recomputed every ``frequency`` optimizer steps and only ever grow (a pruned weight never
  regrows); between updates the pruned weights stay exactly zero.
* :func:`prune_iteratively_` reaches a target in ``steps`` rounds, calling a user's ``recover``
  (fine-tuning, distillation, ...) after each one. ``pruning/`` never imports ``recovery/``: the
  caller passes the recovery as a callable.
* :class:`ScheduleConfig` names the schedule in a recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..importance import create_criterion
from ._masks import MaskSet
from ._structured import StructuredConfig, StructuredResult, prune_structured_
from ._unstructured import UnstructuredConfig, unstructured_masks

Recover = Callable[[nn.Module, MaskSet | None], Any]


class PruneSchedule(str, enum.Enum):
    """When pruning happens: all at once, in prune/recover rounds, or gradually during training."""

    ONESHOT = "oneshot"
    ITERATIVE = "iterative"
    GRADUAL = "gradual"


class Spacing(str, enum.Enum):
    """How iterative rounds split the target: ``geometric`` removes the same fraction of what
    remains each round; ``linear`` removes the same fraction of the original each round."""

    GEOMETRIC = "geometric"
    LINEAR = "linear"


@dataclass(frozen=True)
class ScheduleConfig:
    """Which schedule a recipe uses, and its knobs.

    Attributes:
        kind: ``oneshot``, ``iterative`` or ``gradual``.
        steps: prune/recover rounds of the iterative schedule (>= 1).
        spacing: ``geometric`` or ``linear`` spacing of the iterative targets.
        frequency: optimizer steps between two mask updates of the gradual schedule (>= 1).
        start_fraction, end_fraction: where, as fractions of all fine-tuning steps, the gradual
            schedule starts and reaches its final sparsity; ``0 <= start < end <= 1``.
    """

    kind: PruneSchedule = PruneSchedule.ONESHOT
    steps: int = 3
    spacing: Spacing = Spacing.GEOMETRIC
    frequency: int = 100
    start_fraction: float = 0.0
    end_fraction: float = 0.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", coerce_enum("kind", PruneSchedule, self.kind))
        object.__setattr__(self, "spacing", coerce_enum("spacing", Spacing, self.spacing))
        check_int("steps", self.steps, 1)
        check_int("frequency", self.frequency, 1)
        check_range("start_fraction", self.start_fraction, 0.0, 1.0, high_open=True)
        check_range("end_fraction", self.end_fraction, 0.0, 1.0)
        if self.end_fraction <= self.start_fraction:
            raise ConfigError(
                f"end_fraction={self.end_fraction!r} must be greater than "
                f"start_fraction={self.start_fraction!r}: raise end_fraction or lower start_fraction"
            )

    def step_range(self, total_steps: int) -> tuple[int, int]:
        """``(start_step, end_step)`` of the gradual schedule for a run of ``total_steps``.

        Rounded to whole steps with ``start_step < end_step <= total_steps``.

        Example:
            >>> ScheduleConfig(kind="gradual").step_range(1000)
            (0, 750)
        """
        check_int("total_steps", total_steps, 1)
        start = math.floor(self.start_fraction * total_steps)
        return start, max(start + 1, round(self.end_fraction * total_steps))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        return config_from_dict(cls, data)


def agp_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Sparsity of the automated gradual pruning schedule (Zhu & Gupta 2017) at ``step``.

    ``s_t = final + (initial - final) * (1 - (step - start) / (end - start)) ** 3`` between
    ``start`` and ``end``; ``initial`` before ``start``, ``final`` from ``end`` on (when
    ``start == end`` the schedule is a single jump at ``start``). Pruning is fast early, while
    many redundant weights remain, and slow near the end.

    Example:
        >>> round(agp_sparsity(50, initial=0.0, final=0.8, start=0, end=100), 4)
        0.7

    Raises:
        ConfigError: a sparsity outside [0, 1], a negative ``start`` or ``end < start``.
    """
    check_range("initial", initial, 0.0, 1.0)
    check_range("final", final, 0.0, 1.0)
    check_int("start", start, 0)
    check_int("end", end, start)
    if step >= end:
        return float(final)
    if step <= start:
        return float(initial)
    remaining = 1.0 - (step - start) / (end - start)
    return final + (initial - final) * remaining**3


def iterative_targets(
    final: float, steps: int, *, spacing: Spacing | str = Spacing.GEOMETRIC
) -> list[float]:
    """Cumulative sparsities (or fractions of the original units) after each of ``steps`` rounds.

    ``geometric``: ``1 - (1 - final) ** (k / steps)``, each round removes the same fraction of
    what is left; ``linear``: ``final * k / steps``. The last target is ``final`` exactly.

    Example:
        >>> [round(t, 3) for t in iterative_targets(0.875, 3)]
        [0.5, 0.75, 0.875]

    Raises:
        ConfigError: ``final`` outside [0, 1), ``steps < 1`` or an unknown ``spacing``.
    """
    check_range("final", final, 0.0, 1.0, high_open=True)
    check_int("steps", steps, 1)
    spacing = coerce_enum("spacing", Spacing, spacing)
    if spacing is Spacing.GEOMETRIC:
        targets = [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps + 1)]
    else:
        targets = [final * k / steps for k in range(1, steps + 1)]
    targets[-1] = float(final)
    return targets


class GradualPruner:
    """Gradual magnitude-style pruning during training, on the AGP schedule.

    An ``OptimizerConstraint``: ``fit(model, data, cfg, constraint=pruner)`` (or any loop that
    calls ``optimizer.step()`` inside ``with pruner.hold(optimizer):``) prunes ``model`` while it
    trains. Optimizer steps are counted from 0 at the start of each ``hold``; after step ``t``
    with ``t`` in ``start_step, start_step + frequency, ... <= end_step`` (and at ``end_step``
    itself) the masks are recomputed at ``agp_sparsity(t)`` with
    ``unstructured_masks(..., pruned=previous)``, so they only ever grow and the final mask has
    exactly ``config.sparsity``. Between updates, pruned weights stay exactly zero through every
    step: their gradients are masked, momentum and other optimizer state at pruned positions is
    zeroed on each update, and the masks are re-applied after each step (the semantics of
    :meth:`MaskSet.hold`).

    If the ``hold`` block ends before ``end_step``, the final sparsity is applied on exit (with no
    training after it) and a ``UserWarning`` says so: pick ``end_step`` below the number of steps
    the training runs (``ScheduleConfig.step_range`` does).

    Args:
        model: the model being trained.
        config: what to prune and by which criterion; ``config.sparsity`` is the final sparsity.
        start_step: optimizer step of the first mask update (>= 0).
        end_step: optimizer step at which ``config.sparsity`` is reached (>= ``start_step``).
        frequency: optimizer steps between mask updates (>= 1).
        initial_sparsity: sparsity at ``start_step``, in ``[0, config.sparsity]``.
        calibration, loss_fn: passed to ``unstructured_masks`` for data-driven criteria.

    Attributes (set by ``hold``):
        masks_: the current :class:`MaskSet` (``None`` before the first update); after the
            block, the final masks, still applied to the model.
        history_: ``[(step, target sparsity), ...]``, one entry per mask update.
        step_: optimizer steps counted so far.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> pruner = GradualPruner(net, UnstructuredConfig(sparsity=0.5), end_step=4, frequency=2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with pruner.hold(opt):
        ...     for _ in range(5):
        ...         opt.zero_grad()
        ...         net(torch.randn(4, 8)).sum().backward()
        ...         opt.step()
        >>> [s for _, s in pruner.history_]
        [0.0, 0.4375, 0.5]
    """

    def __init__(
        self,
        model: nn.Module,
        config: UnstructuredConfig,
        *,
        start_step: int = 0,
        end_step: int,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        calibration: Any = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.initial_sparsity = initial_sparsity
        self.calibration = calibration
        self.loss_fn = loss_fn
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.config, UnstructuredConfig):
            raise ConfigError(
                f"GradualPruner needs an UnstructuredConfig, got {type(self.config).__name__}: "
                "use prune_iteratively_ for structured pruning"
            )
        _check_schedulable(self.config, self.calibration)
        check_int("start_step", self.start_step, 0)
        check_int("end_step", self.end_step, self.start_step)
        check_int("frequency", self.frequency, 1)
        check_range("initial_sparsity", self.initial_sparsity, 0.0, self.config.sparsity)

    def sparsity_at(self, step: int) -> float:
        """Target sparsity of this schedule at optimizer step ``step``."""
        return self._agp(step, self.config.sparsity)

    def _agp(self, step: int, final: float) -> float:
        initial = min(self.initial_sparsity, final)
        return agp_sparsity(
            step, initial=initial, final=final, start=self.start_step, end=self.end_step
        )

    def config_at(self, step: int) -> UnstructuredConfig:
        """``config`` with the schedule's sparsity at ``step``; each ``per_layer`` fraction ``v``
        follows its own cubic from ``min(initial_sparsity, v)`` to ``v``."""
        per_layer = {p: self._agp(step, v) for p, v in self.config.per_layer.items()}
        return dataclasses.replace(
            self.config, sparsity=self.sparsity_at(step), per_layer=per_layer
        )

    def _is_update(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    @contextlib.contextmanager
    def hold(self, optimizer: torch.optim.Optimizer) -> Iterator[GradualPruner]:
        """Prune on schedule and keep pruned weights at 0 for every ``optimizer.step()`` inside.

        Resets ``step_``, ``history_`` and ``masks_``: each block runs the whole schedule.
        """
        self._validate()
        self.step_ = 0
        self.history_: list[tuple[int, float]] = []
        self.masks_: MaskSet | None = None
        self._optimizer = optimizer
        self._hooked: set[str] = set()
        self._handles: list[Any] = [optimizer.register_step_post_hook(self._after_step)]
        try:
            if self._is_update(0):
                self._update(0)
            yield self
            if not self.history_ or self.history_[-1][0] < self.end_step:
                warnings.warn(
                    f"training ended after {self.step_} optimizer steps, before "
                    f"end_step={self.end_step}: sparsity {self.config.sparsity:g} was applied at "
                    "the end with no training after it; set end_step below the total steps",
                    stacklevel=3,
                )
                self._update(self.step_, final=True)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._optimizer = None

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self.masks_ is not None:
            self.masks_.apply()
        self.step_ += 1
        if self._is_update(self.step_):
            self._update(self.step_)

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        mask = self.masks_.masks.get(name) if self.masks_ is not None else None
        return grad if mask is None else grad.masked_fill(~mask, 0.0)

    def _update(self, step: int, *, final: bool = False) -> None:
        """Grow the masks to the schedule's sparsity at ``step`` and apply them everywhere."""
        config = self.config if final else self.config_at(step)
        previous = self.masks_.masks if self.masks_ is not None else None
        was_training = self.model.training
        try:
            with torch.enable_grad():  # post-step hooks may run where autograd is off
                keep = unstructured_masks(
                    self.model,
                    config,
                    calibration=self.calibration,
                    loss_fn=self.loss_fn,
                    pruned=previous,
                )
        finally:
            self.model.train(was_training)
        self.masks_ = MaskSet(self.model, keep)  # zeros the newly pruned weights
        self._zero_optimizer_state()
        for name in self.masks_.masks:
            if name not in self._hooked:
                param = self.model.get_parameter(name)
                self._handles.append(param.register_hook(lambda g, n=name: self._mask_grad(n, g)))
                self._hooked.add(name)
        self.history_.append((step, config.sparsity))

    @torch.no_grad()
    def _zero_optimizer_state(self) -> None:
        if self._optimizer is None or self.masks_ is None:
            return
        for name, mask in self.masks_.masks.items():
            state = self._optimizer.state.get(self.model.get_parameter(name), {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.masked_fill_(~mask, 0.0)


def prune_iteratively_(
    model: nn.Module,
    config: UnstructuredConfig | StructuredConfig,
    *,
    steps: int,
    recover: Recover,
    example_inputs: Any = None,
    calibration: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    spacing: Spacing | str = Spacing.GEOMETRIC,
) -> list[MaskSet] | list[StructuredResult]:
    """Reach ``config``'s target in ``steps`` prune → ``recover`` rounds, in place.

    ``UnstructuredConfig``: round ``k`` prunes to the cumulative sparsity
    ``iterative_targets(config.sparsity, steps)[k]``, keeping every weight pruned before
    (``unstructured_masks(..., pruned=previous)``), then calls ``recover(model, masks)`` with the
    round's :class:`MaskSet`; the masks are re-applied after ``recover``, so pruned weights are
    exactly zero whatever it did. Returns one ``MaskSet`` per round (the last one has
    ``config.sparsity``).

    ``StructuredConfig``: the targets are cumulative fractions of the *original* units; round
    ``k`` removes ``1 - (1 - r_k) / (1 - r_{k-1})`` of the current units of each group, so the
    final widths are about ``(1 - config.ratio)`` of the original (each round rounds to whole
    units), then calls ``recover(model, None)``. Needs ``example_inputs``. Returns one
    :class:`StructuredResult` per round.

    ``recover`` is any callable, e.g.
    ``lambda m, masks: finetune(m, data, TrainConfig(epochs=1), masks)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> rounds = prune_iteratively_(
        ...     net, UnstructuredConfig(sparsity=0.75), steps=2, recover=lambda m, masks: None
        ... )
        >>> [round(r.sparsity(), 2) for r in rounds]
        [0.5, 0.75]

    Raises:
        ConfigError: an unknown config type, ``steps < 1``, an unknown ``spacing``, a
            ``recover`` that is not callable, or structured pruning without ``example_inputs``.
    """
    if not callable(recover):
        raise ConfigError(
            "recover must be a callable recover(model, masks): pass e.g. lambda m, masks: None"
        )
    if isinstance(config, UnstructuredConfig):
        _check_schedulable(config, calibration)
        rounds: list[Any] = []
        previous = None
        for round_config in _round_configs(config, "sparsity", steps, spacing):
            keep = unstructured_masks(
                model,
                round_config,
                calibration=calibration,
                loss_fn=loss_fn,
                pruned=previous,
            )
            masks = MaskSet(model, keep)
            recover(model, masks)
            masks.apply()
            previous = masks.masks
            rounds.append(masks)
        return rounds
    if isinstance(config, StructuredConfig):
        if example_inputs is None:
            raise ConfigError(
                "iterative structured pruning needs example_inputs: pass example_inputs=x"
            )
        _check_schedulable(config, calibration)
        # the cap holds for the whole run: a group losing max_ratio of its current units in
        # every round loses 1 - (1 - max_ratio) ** steps of the original, so split it likewise
        round_cap = 1.0 - (1.0 - config.max_ratio) ** (1.0 / steps)
        cumulative = _round_configs(config, "ratio", steps, spacing)
        rounds = []
        for k, target in enumerate(cumulative):
            before = cumulative[k - 1] if k else None
            round_config = dataclasses.replace(
                target,
                ratio=_current_share(target.ratio, before.ratio if before else 0.0),
                per_layer={
                    p: _current_share(v, before.per_layer[p] if before else 0.0)
                    for p, v in target.per_layer.items()
                },
                max_ratio=round_cap,
            )
            result = prune_structured_(
                model, round_config, example_inputs, calibration=calibration, loss_fn=loss_fn
            )
            recover(model, None)
            rounds.append(result)
        return rounds
    raise ConfigError(
        f"prune_iteratively_ does not know {type(config).__name__}: pass an UnstructuredConfig "
        "or StructuredConfig"
    )


def _current_share(target: float, done: float) -> float:
    """Fraction of the current units to remove so that ``target`` of the original units are
    gone when ``done`` of them already are."""
    return max(0.0, 1.0 - (1.0 - target) / (1.0 - done))


def _round_configs(config: Any, field: str, steps: int, spacing: Spacing | str) -> list[Any]:
    """``config`` at each round's cumulative target: ``field`` (sparsity or ratio) and every
    ``per_layer`` fraction follow ``iterative_targets`` to their final values."""
    main = iterative_targets(getattr(config, field), steps, spacing=spacing)
    layers = {p: iterative_targets(v, steps, spacing=spacing) for p, v in config.per_layer.items()}
    return [
        dataclasses.replace(
            config, **{field: main[k]}, per_layer={p: t[k] for p, t in layers.items()}
        )
        for k in range(steps)
    ]


def _check_schedulable(config: Any, calibration: Any) -> None:
    """Refuse, before any work, configs a schedule cannot split and data criteria without data."""
    if getattr(config, "nm", None) is not None:
        raise ConfigError(
            f"nm={config.nm!r} is a fixed pattern that cannot be reached in steps: prune it "
            "one-shot (ScheduleConfig(kind='oneshot'))"
        )
    if getattr(create_criterion(config.criterion), "needs", ()) and calibration is None:
        raise ConfigError(
            f"criterion {config.criterion!r} needs calibration data: pass calibration=[(x, y), ...] "
            "or a data split"
        )
