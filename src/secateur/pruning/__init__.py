"""pruning/: decide what goes and apply it: masks (unstructured, N:M, SparseGPT reconstruction),
or physical removal of channels (structured) or of whole residual blocks (depth); one-shot,
iterative or gradual (AGP) schedules."""

from ._api import prune_ as prune_
from ._attention import PrunedMultiheadAttention as PrunedMultiheadAttention
from ._depth import DepthConfig as DepthConfig
from ._depth import DepthResult as DepthResult
from ._depth import Skip as Skip
from ._expert_removal import ExpertConfig as ExpertConfig
from ._expert_removal import ExpertResult as ExpertResult
from ._expert_removal import prune_experts_ as prune_experts_
from ._masks import MaskSet as MaskSet
from ._schedule import GradualPruner as GradualPruner
from ._schedule import PruneSchedule as PruneSchedule
from ._schedule import ScheduleConfig as ScheduleConfig
from ._schedule import Spacing as Spacing
from ._schedule import agp_sparsity as agp_sparsity
from ._schedule import iterative_targets as iterative_targets
from ._schedule import prune_iteratively_ as prune_iteratively_
from ._sparsegpt import SparseGPTConfig as SparseGPTConfig
from ._sparsegpt import prune_sparsegpt_ as prune_sparsegpt_
from ._structured import StructuredConfig as StructuredConfig
from ._structured import StructuredResult as StructuredResult
from ._unstructured import Scope as Scope
from ._unstructured import UnstructuredConfig as UnstructuredConfig
from ._unstructured import prunable_weights as prunable_weights
from ._unstructured import unstructured_masks as unstructured_masks

__all__ = [
    "DepthConfig",
    "DepthResult",
    "ExpertConfig",
    "ExpertResult",
    "GradualPruner",
    "MaskSet",
    "PruneSchedule",
    "PrunedMultiheadAttention",
    "ScheduleConfig",
    "Spacing",
    "agp_sparsity",
    "iterative_targets",
    "prune_iteratively_",
    "prune_experts_",
    "prune_sparsegpt_",
    "Scope",
    "Skip",
    "SparseGPTConfig",
    "StructuredConfig",
    "StructuredResult",
    "UnstructuredConfig",
    "prunable_weights",
    "prune_",
    "unstructured_masks",
]
