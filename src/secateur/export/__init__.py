"""export/: artifacts on disk. Now: safetensors + JSON manifest (dense; zeros take full space)."""

from ._safetensors import MANIFEST_FORMAT as MANIFEST_FORMAT
from ._safetensors import LoadedModel as LoadedModel
from ._safetensors import load_model as load_model
from ._safetensors import manifest_path_for as manifest_path_for
from ._safetensors import save_model as save_model
from ._safetensors import update_metadata as update_metadata

__all__ = [
    "MANIFEST_FORMAT",
    "LoadedModel",
    "load_model",
    "manifest_path_for",
    "save_model",
    "update_metadata",
]
