"""The settings of the ``compress`` job: one frozen config shared by the CLI, YAML and Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..pruning import Scope, StructuredConfig, UnstructuredConfig
from ..training import LRSchedule, TrainConfig
from ..zoo import list_models


class CompressMethod(str, enum.Enum):
    """How ``compress`` prunes: zero single weights, or remove whole channels and neurons."""

    UNSTRUCTURED = "unstructured"
    STRUCTURED = "structured"


#: Settings read only by one method; the CLI rejects those given for the other method.
UNSTRUCTURED_ONLY = ("sparsity", "scope", "criterion")
STRUCTURED_ONLY = ("ratio", "round_to")


@dataclass(frozen=True)
class CompressConfig:
    """Train (or load) a baseline, prune it, fine-tune it, measure both and save the result.

    ``method="unstructured"`` (the default) zeros ``sparsity`` of the weights by ``criterion``
    with a ``scope`` threshold and fine-tunes with the masks held; the model keeps its shape.
    ``method="structured"`` removes ``ratio`` of the units of every coupled channel group (by
    group L2 magnitude, each group's width kept a multiple of ``round_to``), so the saved model
    is physically smaller, then fine-tunes without masks. Each method ignores the other's
    settings (``UNSTRUCTURED_ONLY`` / ``STRUCTURED_ONLY``); all of them are still validated.

    ``data=None`` reads Fashion-MNIST from the Debian package's folder. ``baseline`` names a
    checkpoint saved by secateur to prune instead of training one. ``cache=True`` reuses a
    baseline trained earlier with identical settings. ``limit`` caps train and test images
    (for quick trials). ``threads=None`` keeps torch's default.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> CompressConfig(method="structured", ratio=0.5).pruning()
        StructuredConfig(ratio=0.5, round_to=1, ignore=())
    """

    model: str = "lenet5"
    data: str | None = None
    method: CompressMethod = CompressMethod.UNSTRUCTURED
    sparsity: float = 0.85
    scope: Scope = Scope.GLOBAL
    criterion: str = "magnitude"
    ratio: float = 0.5
    round_to: int = 1
    epochs: int = 8
    finetune_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    finetune_lr: float = 0.02
    schedule: LRSchedule = LRSchedule.COSINE
    seed: int = 0
    device: str = "auto"
    out: str = "secateur-out"
    baseline: str | None = None
    cache: bool = True
    limit: int | None = None
    threads: int | None = None
    latency_runs: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in list_models():
            names = ", ".join(list_models())
            raise ConfigError(f"unknown model '{self.model}': choose one of {names}")
        object.__setattr__(self, "method", coerce_enum("method", CompressMethod, self.method))
        object.__setattr__(self, "scope", coerce_enum("scope", Scope, self.scope))
        object.__setattr__(self, "schedule", coerce_enum("schedule", LRSchedule, self.schedule))
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_range("finetune_lr", self.finetune_lr, 0.0, low_open=True)
        check_int("latency_runs", self.latency_runs, 20)
        if self.limit is not None:
            check_int("limit", self.limit, 10)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        self.unstructured_pruning()  # validates sparsity and criterion
        self.structured_pruning()  # validates ratio and round_to
        self.baseline_training()  # validates epochs, batch_size, lr

    def pruning(self) -> UnstructuredConfig | StructuredConfig:
        """The config handed to ``prune_`` for this job's ``method``."""
        if self.method is CompressMethod.STRUCTURED:
            return self.structured_pruning()
        return self.unstructured_pruning()

    def unstructured_pruning(self) -> UnstructuredConfig:
        return UnstructuredConfig(
            sparsity=self.sparsity, scope=self.scope, criterion=self.criterion
        )

    def structured_pruning(self) -> StructuredConfig:
        return StructuredConfig(ratio=self.ratio, round_to=self.round_to)

    def baseline_training(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            schedule=self.schedule,
            seed=self.seed,
        )

    def finetuning(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.finetune_epochs,
            batch_size=self.batch_size,
            lr=self.finetune_lr,
            schedule=self.schedule,
            seed=self.seed + 1,
        )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        return config_from_dict(cls, data)
