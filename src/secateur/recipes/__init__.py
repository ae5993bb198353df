"""recipes/: whole jobs wired from the stages; the same config from Python, CLI or YAML."""

from ._compress import CompressResult as CompressResult
from ._compress import default_cache_dir as default_cache_dir
from ._compress import run_compress as run_compress
from ._compress_config import STRUCTURED_ONLY as STRUCTURED_ONLY
from ._compress_config import UNSTRUCTURED_ONLY as UNSTRUCTURED_ONLY
from ._compress_config import CompressConfig as CompressConfig
from ._compress_config import CompressMethod as CompressMethod

__all__ = [
    "STRUCTURED_ONLY",
    "UNSTRUCTURED_ONLY",
    "CompressConfig",
    "CompressMethod",
    "CompressResult",
    "default_cache_dir",
    "run_compress",
]
