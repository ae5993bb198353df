"""Bytes on disk at each stage of the compression pipeline, for the report.

Every figure is the length of the exact bytes the corresponding writer produces for this model
(the dense safetensors file, or the compressed file with a prefix of the pipeline enabled), so
the last stage equals the size of the file :func:`save_compressed` writes with the same config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ._compressed import CompressionConfig, Entropy, ValueCoding, compressed_bytes
from ._safetensors import tensors_to_save


@dataclass(frozen=True)
class StageSize:
    """One pipeline stage: its name and the bytes its file takes."""

    name: str
    bytes: int


def _values_label(config: CompressionConfig) -> str:
    if config.values is ValueCoding.CODEBOOK:
        bits = sorted({config.bits, *config.per_layer.values()})
        return f"+ {'/'.join(map(str, bits))}-bit codebooks"
    return f"+ {config.values.value} values"


def compression_stages(
    model: nn.Module, config: CompressionConfig, *, metadata: dict[str, Any] | None = None
) -> list[StageSize]:
    """Sizes of: dense safetensors → sparse index + exact values → + quantized values → + zstd.

    The quantized stage is left out when ``config.values`` is ``exact``, the zstd stage when
    ``config.entropy`` is ``none``. Pass the ``metadata`` the file will be saved with, since
    the header holds it.
    """
    tensors, _ = tensors_to_save(model)
    stages = [StageSize("dense weights (safetensors)", len(save_safetensors_bytes(tensors)))]
    raw = dataclasses.replace(config, entropy=Entropy.NONE)
    exact = dataclasses.replace(raw, values=ValueCoding.EXACT)

    def size(cfg: CompressionConfig) -> int:
        return len(compressed_bytes(model, cfg, metadata=metadata))

    stages.append(StageSize("sparse index + exact values", size(exact)))
    if config.values is not ValueCoding.EXACT:
        stages.append(StageSize(_values_label(config), size(raw)))
    if config.entropy is Entropy.ZSTD:
        stages.append(StageSize("+ zstd", size(config)))
    return stages
