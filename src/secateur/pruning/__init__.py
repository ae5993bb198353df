"""pruning/: decide what goes and apply it: masks (unstructured), or physical removal of channels
(structured) or of whole residual blocks (depth)."""

from ._api import prune_ as prune_
from ._depth import DepthConfig as DepthConfig
from ._depth import DepthResult as DepthResult
from ._depth import Skip as Skip
from ._masks import MaskSet as MaskSet
from ._structured import StructuredConfig as StructuredConfig
from ._structured import StructuredResult as StructuredResult
from ._unstructured import Scope as Scope
from ._unstructured import UnstructuredConfig as UnstructuredConfig
from ._unstructured import prunable_weights as prunable_weights
from ._unstructured import unstructured_masks as unstructured_masks

__all__ = [
    "DepthConfig",
    "DepthResult",
    "MaskSet",
    "Scope",
    "Skip",
    "StructuredConfig",
    "StructuredResult",
    "UnstructuredConfig",
    "prunable_weights",
    "prune_",
    "unstructured_masks",
]
