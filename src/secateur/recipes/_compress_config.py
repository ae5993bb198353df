"""The settings of the ``compress`` job: one frozen config shared by the CLI, YAML and Python."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..pruning import (
    DepthConfig,
    PruneSchedule,
    Scope,
    SparseGPTConfig,
    StructuredConfig,
    UnstructuredConfig,
)
from ..recovery import DistillConfig
from ..training import LRSchedule, TrainConfig
from ..zoo import list_models


class CompressMethod(str, enum.Enum):
    """How ``compress`` prunes: zero single weights (by a criterion, or by SparseGPT's
    reconstruction), remove whole channels and neurons, or remove whole residual blocks."""

    UNSTRUCTURED = "unstructured"
    STRUCTURED = "structured"
    SPARSEGPT = "sparsegpt"
    DEPTH = "depth"


class Recovery(str, enum.Enum):
    """How the pruned model wins accuracy back: plain fine-tuning, or distillation from the
    unpruned baseline (KL on temperature-softened logits plus cross-entropy)."""

    FINETUNE = "finetune"
    DISTILL = "distill"


#: Settings each method reads; the CLI rejects a setting given for a method that ignores it.
METHOD_SETTINGS: dict[str, tuple[CompressMethod, ...]] = {
    "sparsity": (CompressMethod.UNSTRUCTURED, CompressMethod.SPARSEGPT),
    "nm": (CompressMethod.UNSTRUCTURED, CompressMethod.SPARSEGPT),
    "criterion": (CompressMethod.UNSTRUCTURED, CompressMethod.STRUCTURED),
    "scope": (CompressMethod.UNSTRUCTURED, CompressMethod.STRUCTURED),
    "normalize": (CompressMethod.UNSTRUCTURED, CompressMethod.STRUCTURED),
    "ratio": (CompressMethod.STRUCTURED,),
    "round_to": (CompressMethod.STRUCTURED,),
    "reconstruct": (CompressMethod.STRUCTURED,),
    "dense_targets": (CompressMethod.SPARSEGPT,),
    "depth_ratio": (CompressMethod.STRUCTURED, CompressMethod.DEPTH),
}


@dataclass(frozen=True)
class CompressConfig:
    """Train (or load) a baseline, prune it, fine-tune it, measure both and save the result.

    ``method="unstructured"`` (the default) zeros ``sparsity`` of the weights (or an ``nm``
    pattern such as ``"2:4"``) by ``criterion`` with a ``scope`` threshold and fine-tunes with
    the masks held; the model keeps its shape. ``method="sparsegpt"`` zeros them layer by layer
    and reconstructs the remaining weights from calibration data (with ``dense_targets``, toward
    the dense model's layer outputs). ``method="structured"``
    removes ``ratio`` of the units of the coupled channel groups (``scope`` layer: of each group;
    global: of all, ranked together), each group's width kept a multiple of ``round_to``, so the
    saved model is physically smaller (with ``reconstruct``, the layers reading the removed
    units are first refitted by least squares on the calibration batches), then fine-tunes
    without masks. ``method="depth"``
    replaces ``depth_ratio`` of the model's residual blocks (ResNet blocks, transformer layers),
    the least influential first, by an identity ``Skip`` and fine-tunes without masks;
    ``structured`` with ``depth_ratio > 0`` removes those blocks first, then channels from what
    is left. ``criterion``, ``scope`` and ``normalize`` left at ``None`` take the method's
    default (magnitude, global, none for weights; l2, layer, mean for channels). Settings a method ignores are listed in
    ``METHOD_SETTINGS``; all of them are still validated.

    Data criteria and SparseGPT read ``calibration_batches`` training batches. ``prune_schedule``
    is ``oneshot``, ``iterative`` (``prune_steps`` prune/recover rounds, the fine-tuning epochs
    split between them) or ``gradual`` (unstructured only: cubic AGP during fine-tuning).
    ``recovery="distill"`` fine-tunes by distillation from the baseline. Before any recovery,
    ``recalibrate_bn`` re-estimates the BatchNorm statistics of the pruned model on the
    calibration batches (nothing happens in a model without BatchNorm); with
    ``finetune_epochs=0`` that is all the recovery there is.

    ``data=None`` reads Fashion-MNIST from the Debian package's folder. ``baseline`` names a
    checkpoint saved by secateur to prune instead of training one. ``cache=True`` reuses a
    baseline trained earlier with identical settings. ``limit`` caps train and test images
    (for quick trials). ``threads=None`` keeps torch's default.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> CompressConfig(method="structured", ratio=0.5, criterion="taylor").pruning().criterion
        'taylor'
    """

    model: str = "lenet5"
    data: str | None = None
    method: CompressMethod = CompressMethod.UNSTRUCTURED
    sparsity: float = 0.85
    nm: str | None = None
    scope: Scope | None = None
    criterion: str | None = None
    normalize: str | None = None
    ratio: float = 0.5
    round_to: int = 1
    reconstruct: bool = False
    depth_ratio: float = 0.0
    dense_targets: bool = False
    calibration_batches: int = 8
    prune_schedule: PruneSchedule = PruneSchedule.ONESHOT
    prune_steps: int = 3
    recovery: Recovery = Recovery.FINETUNE
    recalibrate_bn: bool = True
    temperature: float = 4.0
    alpha: float = 0.9
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
        if self.scope is not None:
            object.__setattr__(self, "scope", coerce_enum("scope", Scope, self.scope))
        object.__setattr__(
            self,
            "prune_schedule",
            coerce_enum("prune_schedule", PruneSchedule, self.prune_schedule),
        )
        object.__setattr__(self, "recovery", coerce_enum("recovery", Recovery, self.recovery))
        check_range("depth_ratio", self.depth_ratio, 0.0, 1.0, high_open=True)
        check_int("calibration_batches", self.calibration_batches, 1)
        check_int("prune_steps", self.prune_steps, 1)
        if not isinstance(self.recalibrate_bn, bool):
            raise ConfigError(f"recalibrate_bn={self.recalibrate_bn!r} must be true or false")
        self.distillation()  # validates temperature and alpha
        if (
            self.prune_schedule is PruneSchedule.GRADUAL
            and self.method is not CompressMethod.UNSTRUCTURED
        ):
            raise ConfigError(
                f"prune_schedule gradual works with method unstructured only, not {self.method.value}: "
                "use prune_schedule oneshot or iterative"
            )
        if (
            self.method is CompressMethod.SPARSEGPT
            and self.prune_schedule is not PruneSchedule.ONESHOT
        ):
            raise ConfigError("method sparsegpt is one-shot by design: use prune_schedule oneshot")
        if self.method is CompressMethod.DEPTH:
            if self.prune_schedule is not PruneSchedule.ONESHOT:
                raise ConfigError(
                    "method depth removes whole blocks at once: use prune_schedule oneshot"
                )
            if self.depth_ratio == 0:
                raise ConfigError(
                    "method depth removes depth_ratio of the residual blocks, which is 0: "
                    "pass --depth-ratio (e.g. 0.25) or set depth_ratio in the recipe"
                )
        if self.nm is not None and self.prune_schedule is not PruneSchedule.ONESHOT:
            raise ConfigError("an nm pattern is applied at once: use prune_schedule oneshot")
        object.__setattr__(self, "schedule", coerce_enum("schedule", LRSchedule, self.schedule))
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_range("finetune_lr", self.finetune_lr, 0.0, low_open=True)
        check_int("latency_runs", self.latency_runs, 20)
        if self.limit is not None:
            check_int("limit", self.limit, 10)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        self.unstructured_pruning()  # validates sparsity, nm and criterion
        self.structured_pruning()  # validates ratio and round_to
        self.depth_pruning()  # validates depth_ratio
        self.sparsegpt_pruning()
        self.baseline_training()  # validates epochs, batch_size, lr

    def pruning(self) -> UnstructuredConfig | StructuredConfig | SparseGPTConfig | DepthConfig:
        """The config handed to ``prune_`` for this job's ``method`` (for ``structured`` with
        ``depth_ratio > 0``, the channel step; :meth:`depth_pruning` runs before it)."""
        if self.method is CompressMethod.STRUCTURED:
            return self.structured_pruning()
        if self.method is CompressMethod.DEPTH:
            return self.depth_pruning()
        if self.method is CompressMethod.SPARSEGPT:
            return self.sparsegpt_pruning()
        return self.unstructured_pruning()

    def _given(self, **defaults: Any) -> dict[str, Any]:
        """criterion/scope/normalize as set, the method's defaults where left at None."""
        given = {"criterion": self.criterion, "scope": self.scope, "normalize": self.normalize}
        return {k: v for k, v in given.items() if v is not None} | {
            k: v for k, v in defaults.items() if given[k] is None
        }

    def unstructured_pruning(self) -> UnstructuredConfig:
        return UnstructuredConfig(sparsity=self.sparsity, nm=self.nm, **self._given())

    def structured_pruning(self) -> StructuredConfig:
        return StructuredConfig(
            ratio=self.ratio,
            round_to=self.round_to,
            reconstruct=self.reconstruct,
            **self._given(),
        )

    def depth_pruning(self) -> DepthConfig:
        """The residual blocks to remove: ``depth_ratio`` of them (0 for none)."""
        return DepthConfig(ratio=self.depth_ratio)

    def sparsegpt_pruning(self) -> SparseGPTConfig:
        return SparseGPTConfig(sparsity=self.sparsity, nm=self.nm, dense_targets=self.dense_targets)

    def distillation(self) -> DistillConfig:
        return DistillConfig(temperature=self.temperature, alpha=self.alpha)

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


def compress_settings(config: Any, *, skip: tuple[str, ...] = ()) -> CompressConfig:
    """The fields of another job's ``config`` that :class:`CompressConfig` also has (but
    ``skip``), as a compress job: one definition of how a baseline is trained, cached and
    fine-tuned, shared by every job that starts from one."""
    names = {f.name for f in dataclasses.fields(CompressConfig)} - set(skip)
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return CompressConfig(**{name: value for name, value in given.items() if name in names})
