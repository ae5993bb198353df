"""secateur: make trained PyTorch networks smaller and faster, and prove it with measurements.

The flow, one way: data/zoo (inputs) → graph → importance → pruning → recovery → quantization/
export (and runtime/, which runs pruned models faster) → measure → report, with explore/
(sensitivity) above them and recipes/ and cli/ wiring them together. ``training/`` is the shared
loop below it all.

Example:
    >>> import torch
    >>> from secateur import UnstructuredConfig, create_model, measure, prune_
    >>> net = create_model("lenet_300_100")
    >>> masks = prune_(net, UnstructuredConfig(sparsity=0.9))
    >>> m = measure(net, torch.zeros(1, 1, 28, 28), latency_runs=20)
    >>> round(1 - m.nonzero_params / m.params, 1)
    0.9
"""

from .errors import ArtifactError as ArtifactError
from .errors import ConfigError as ConfigError
from .errors import DatasetError as DatasetError
from .errors import OutputError as OutputError
from .errors import PruningError as PruningError
from .errors import SecateurError as SecateurError
from .export import load_model as load_model
from .export import save_model as save_model
from .measure import Metrics as Metrics
from .measure import measure as measure
from .pruning import DepthConfig as DepthConfig
from .pruning import ExpertConfig as ExpertConfig
from .pruning import MaskSet as MaskSet
from .pruning import Scope as Scope
from .pruning import SparseGPTConfig as SparseGPTConfig
from .pruning import StructuredConfig as StructuredConfig
from .pruning import UnstructuredConfig as UnstructuredConfig
from .pruning import prune_ as prune_
from .zoo import create_model as create_model
from .zoo import list_models as list_models

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DatasetError",
    "DepthConfig",
    "ExpertConfig",
    "MaskSet",
    "Metrics",
    "OutputError",
    "PruningError",
    "Scope",
    "SecateurError",
    "SparseGPTConfig",
    "StructuredConfig",
    "UnstructuredConfig",
    "create_model",
    "list_models",
    "load_model",
    "measure",
    "prune_",
    "save_model",
]
