"""recipes/: whole jobs wired from the stages; the same config from Python, CLI or YAML."""

from ._compress import CompressResult as CompressResult
from ._compress import default_cache_dir as default_cache_dir
from ._compress import run_compress as run_compress
from ._compress_config import METHOD_SETTINGS as METHOD_SETTINGS
from ._compress_config import CompressConfig as CompressConfig
from ._compress_config import CompressMethod as CompressMethod
from ._compress_config import Recovery as Recovery
from ._distill import DistillJobConfig as DistillJobConfig
from ._distill import DistillResult as DistillResult
from ._distill import run_distill as run_distill
from ._sensitivity import AllocationCheck as AllocationCheck
from ._sensitivity import SensitivityConfig as SensitivityConfig
from ._sensitivity import SensitivityJobResult as SensitivityJobResult
from ._sensitivity import run_sensitivity as run_sensitivity

__all__ = [
    "METHOD_SETTINGS",
    "AllocationCheck",
    "CompressConfig",
    "CompressMethod",
    "CompressResult",
    "DistillJobConfig",
    "DistillResult",
    "Recovery",
    "SensitivityConfig",
    "SensitivityJobResult",
    "default_cache_dir",
    "run_compress",
    "run_distill",
    "run_sensitivity",
]
