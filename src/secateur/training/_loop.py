"""A fast, plain supervised loop: SGD with momentum and a cosine or one-cycle schedule."""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from .._progress import make_progress
from ..data import DataSplits
from ._evaluate import evaluate

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LRSchedule(str, enum.Enum):
    COSINE = "cosine"
    ONE_CYCLE = "onecycle"
    CONSTANT = "constant"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`fit`; validated on construction (``ConfigError`` names the field)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: LRSchedule = LRSchedule.COSINE
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 0)
        check_int("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "schedule", coerce_enum("schedule", LRSchedule, self.schedule))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)


class OptimizerConstraint(Protocol):
    """Something that must hold across optimizer steps (e.g. pruning masks)."""

    def hold(self, optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_top1: float


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule is LRSchedule.ONE_CYCLE:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(1, total_steps)
        )
    if config.schedule is LRSchedule.COSINE:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: (
                0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
            ),
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def fit(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    *,
    constraint: OptimizerConstraint | None = None,
    loss_fn: LossFn | None = None,
    extra_parameters: Iterable[nn.Parameter] = (),
    description: str = "train",
    progress: bool = True,
) -> list[EpochRecord]:
    """Train ``model`` in place on ``data.train`` on the device its parameters live on.

    Args:
        constraint: held across every optimizer step (pruning masks keep pruned weights at 0).
        loss_fn: ``loss_fn(logits, targets, inputs)``; defaults to cross-entropy with the
            configured label smoothing. Distillation passes its own.
        extra_parameters: optimized with the model's parameters but not part of it (e.g.
            distillation's feature adapters, read by ``loss_fn``).
        progress: draw a progress bar over all steps.

    Returns:
        One :class:`EpochRecord` per epoch, with validation top-1 (``nan`` when ``data.val`` is empty).

    The run is deterministic for a given ``config.seed`` on CPU: the seed fixes both the
    shuffling generator and torch's global RNG (dropout, if any).
    """
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(
        [*model.parameters(), *extra_parameters],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    scheduler = _scheduler(optimizer, config, steps_per_epoch * config.epochs)
    if loss_fn is None:
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

        def loss_fn(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return criterion(logits, y)

    history = []
    held = constraint.hold(optimizer) if constraint is not None else contextlib.nullcontext()
    with held, make_progress(enabled=progress) as bar:
        task = bar.add_task(description, total=steps_per_epoch * config.epochs, status="")
        for epoch in range(config.epochs):
            model.train()
            total_loss, seen = 0.0, 0
            for x, y in data.train.batches(
                config.batch_size, shuffle=True, generator=generator, device=device, drop_last=True
            ):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y, x)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{config.epochs}")
            val = evaluate(model, data.val) if len(data.val) else float("nan")
            history.append(EpochRecord(epoch + 1, total_loss / max(1, seen), val))
            bar.update(task, status=f"epoch {epoch + 1}/{config.epochs} val {val:.2%}")
    model.eval()
    return history
