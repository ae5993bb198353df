"""training/: the plain supervised loop and evaluation, used by the baseline and by recovery.

A foundation package like ``data`` and ``zoo``: it sits below the flow and any stage may use it.
"""

from ._device import resolve_device as resolve_device
from ._evaluate import evaluate as evaluate
from ._loop import EpochRecord as EpochRecord
from ._loop import LRSchedule as LRSchedule
from ._loop import OptimizerConstraint as OptimizerConstraint
from ._loop import TrainConfig as TrainConfig
from ._loop import fit as fit

__all__ = [
    "EpochRecord",
    "LRSchedule",
    "OptimizerConstraint",
    "TrainConfig",
    "evaluate",
    "fit",
    "resolve_device",
]
