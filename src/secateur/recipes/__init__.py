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
from ._encoder import EncoderResult as EncoderResult
from ._encoder import run_encoder as run_encoder
from ._encoder_config import EncoderConfig as EncoderConfig
from ._export import ExportResult as ExportResult
from ._export import run_export as run_export
from ._export_config import FORMAT_SETTINGS as FORMAT_SETTINGS
from ._export_config import ExportConfig as ExportConfig
from ._export_config import ExportFormat as ExportFormat
from ._plan import PlanConfig as PlanConfig
from ._plan import PlanJobResult as PlanJobResult
from ._plan import run_plan as run_plan
from ._sensitivity import AllocationCheck as AllocationCheck
from ._sensitivity import SensitivityConfig as SensitivityConfig
from ._sensitivity import SensitivityJobResult as SensitivityJobResult
from ._sensitivity import run_sensitivity as run_sensitivity
from ._sweep import SweepConfig as SweepConfig
from ._sweep import SweepJobResult as SweepJobResult
from ._sweep import run_sweep as run_sweep

__all__ = [
    "FORMAT_SETTINGS",
    "ExportConfig",
    "ExportFormat",
    "ExportResult",
    "run_export",
    "run_plan",
    "METHOD_SETTINGS",
    "AllocationCheck",
    "CompressConfig",
    "CompressMethod",
    "CompressResult",
    "DistillJobConfig",
    "DistillResult",
    "EncoderConfig",
    "EncoderResult",
    "PlanConfig",
    "PlanJobResult",
    "Recovery",
    "SensitivityConfig",
    "SensitivityJobResult",
    "SweepConfig",
    "SweepJobResult",
    "default_cache_dir",
    "run_compress",
    "run_distill",
    "run_encoder",
    "run_sensitivity",
    "run_sweep",
]
