"""The settings of the ``export`` job: one frozen config shared by the CLI, YAML and Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..export import CompressionConfig
from ..quantization import QuantMode


class ExportFormat(str, enum.Enum):
    """``onnx``: fp32 ONNX; ``onnx-int8``: ONNX quantized to int8 by ONNX Runtime;
    ``compressed``: secateur's sparse + quantized + zstd file (``.secz``)."""

    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"
    COMPRESSED = "compressed"


SUFFIXES = {
    ExportFormat.ONNX: ".onnx",
    ExportFormat.ONNX_INT8: ".int8.onnx",
    ExportFormat.COMPRESSED: ".secz",
}

#: Settings each format reads; the CLI rejects a setting given for a format that ignores it.
FORMAT_SETTINGS: dict[str, tuple[ExportFormat, ...]] = {
    "quantize": (ExportFormat.ONNX_INT8,),
    "calibration_batches": (ExportFormat.ONNX_INT8,),
    "per_channel": (ExportFormat.ONNX_INT8,),
    "opset": (ExportFormat.ONNX, ExportFormat.ONNX_INT8),
    "values": (ExportFormat.COMPRESSED,),
    "bits": (ExportFormat.COMPRESSED,),
    "per_layer_bits": (ExportFormat.COMPRESSED,),
    "index": (ExportFormat.COMPRESSED,),
    "entropy": (ExportFormat.COMPRESSED,),
    "finetune_epochs": (ExportFormat.COMPRESSED,),
    "finetune_lr": (ExportFormat.COMPRESSED,),
}


@dataclass(frozen=True)
class ExportConfig:
    """Turn a checkpoint saved by secateur into a deployable file, and measure what it costs.

    ``checkpoint`` is a ``.safetensors`` model written by ``compress`` (or ``save_model``).
    ``out`` is the artifact's path; ``None`` puts it beside the checkpoint with the format's
    suffix (``.onnx``, ``.int8.onnx`` or ``.secz``).

    ``onnx-int8`` quantizes with ONNX Runtime, ``static`` (activation ranges calibrated on
    ``calibration_batches`` training batches) or ``dynamic``; ``per_channel`` weight scales.
    ``compressed`` stores weights as ``values`` (``codebook`` of ``bits`` bits, per-layer
    overrides in ``per_layer_bits``; ``int8``; ``float16``; ``exact``) behind a sparse
    ``index``, then ``entropy`` codes the payload. With a codebook and ``finetune_epochs`` > 0
    the weights are first clustered and the centroids fine-tuned at ``finetune_lr`` (Deep
    Compression's trained quantization), so the file then holds them exactly.

    The test split (Fashion-MNIST from ``data``, or the Debian package's folder) gives the
    accuracy of the checkpoint and of the artifact, each on its own runtime; latencies are
    timed interleaved with ``latency_runs`` runs on the first ``latency_batch`` test images.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.
    """

    checkpoint: str = ""
    format: ExportFormat = ExportFormat.COMPRESSED
    out: str | None = None
    quantize: QuantMode = QuantMode.STATIC
    calibration_batches: int = 8
    per_channel: bool = True
    opset: int = 17
    values: str = "codebook"
    bits: int = 5
    per_layer_bits: dict[str, int] = field(default_factory=dict)
    index: str = "auto"
    entropy: str = "zstd"
    finetune_epochs: int = 0
    finetune_lr: float = 0.001
    batch_size: int = 128
    data: str | None = None
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    latency_runs: int = 50
    latency_batch: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ConfigError(
                "checkpoint is required: pass the .safetensors file written by secateur compress"
            )
        if not self.checkpoint.endswith(".safetensors"):
            raise ConfigError(
                f"checkpoint={self.checkpoint!r} is not a .safetensors file: pass the model "
                "written by secateur compress (e.g. secateur-out/pruned.safetensors)"
            )
        object.__setattr__(self, "format", coerce_enum("format", ExportFormat, self.format))
        object.__setattr__(self, "quantize", coerce_enum("quantize", QuantMode, self.quantize))
        check_int("calibration_batches", self.calibration_batches, 1)
        check_int("opset", self.opset, 13)
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_range("finetune_lr", self.finetune_lr, 0.0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_int("latency_runs", self.latency_runs, 20)
        check_int("latency_batch", self.latency_batch, 1)
        if self.limit is not None:
            check_int("limit", self.limit, 1)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"per_channel={self.per_channel!r} must be true or false")
        self.compression()  # validates values, bits, per_layer_bits, index and entropy
        if self.out is not None and not str(self.out).endswith(SUFFIXES[self.format]):
            suffix = SUFFIXES[self.format]
            raise ConfigError(
                f"out={self.out!r} does not end in {suffix}: name the {self.format.value} file "
                f"e.g. model{suffix}"
            )

    def compression(self) -> CompressionConfig:
        return CompressionConfig(
            values=self.values,
            bits=self.bits,
            per_layer=self.per_layer_bits,
            index=self.index,
            entropy=self.entropy,
        )

    def artifact_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        source = Path(self.checkpoint)
        return source.with_name(source.name.removesuffix(".safetensors") + SUFFIXES[self.format])

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportConfig:
        return config_from_dict(cls, data)
