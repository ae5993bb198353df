"""Fine-tuning with the pruned structure fixed."""

from __future__ import annotations

from torch import nn

from ..data import DataSplits
from ..pruning import MaskSet
from ..training import EpochRecord, TrainConfig, fit


def finetune(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    masks: MaskSet | None = None,
    *,
    progress: bool = True,
) -> list[EpochRecord]:
    """Train ``model`` in place while ``masks`` keep every pruned weight exactly zero.

    Returns the per-epoch records of :func:`secateur.training.fit`.
    """
    return fit(model, data, config, constraint=masks, description="fine-tune", progress=progress)
