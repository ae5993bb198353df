"""The one measurement value that the CLI and every report render.

A :class:`Metrics` is frozen and JSON-round-trippable; nothing in it is derived from a requested
ratio: each figure comes from counting tensors, running the model or stat-ing a file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerSparsity:
    """Parameter counts of one module's own weight tensor (bias excluded)."""

    name: str
    params: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0


@dataclass(frozen=True)
class Latency:
    """Median wall-clock time of one forward pass, with the conditions it was measured under."""

    median_ms: float
    p90_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    device: str
    runtime: str

    def conditions(self) -> str:
        return (
            f"batch {self.batch_size}, {self.threads} threads, {self.device}, {self.runtime}, "
            f"median of {self.runs} runs after {self.warmup} warm-up"
        )


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy on a named split."""

    top1: float
    samples: int
    split: str


@dataclass(frozen=True)
class Metrics:
    """Everything measured about one model.

    ``macs`` counts dense multiply-accumulates of one sample (zeros included, since dense kernels
    compute them); ``nonzero_macs`` counts only those whose weight is non-zero, i.e. the work a
    sparse kernel would do. ``latency`` times the PyTorch model, ``onnx_latency`` its ONNX file
    in ONNX Runtime (timed interleaved with it). ``None`` means "not measured", never "zero".
    """

    params: int
    nonzero_params: int
    macs: int
    nonzero_macs: int
    layers: tuple[LayerSparsity, ...] = field(default=())
    latency: Latency | None = None
    disk_bytes: int | None = None
    accuracy: Accuracy | None = None
    onnx_latency: Latency | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters that are exactly zero."""
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def replace(self, **changes: Any) -> Metrics:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``TypeError`` on a malformed dict."""
        lat = data.get("latency")
        acc = data.get("accuracy")
        onnx_lat = data.get("onnx_latency")
        return cls(
            params=int(data["params"]),
            nonzero_params=int(data["nonzero_params"]),
            macs=int(data["macs"]),
            nonzero_macs=int(data["nonzero_macs"]),
            layers=tuple(LayerSparsity(**layer) for layer in data.get("layers", ())),
            latency=Latency(**lat) if lat is not None else None,
            disk_bytes=data.get("disk_bytes"),
            accuracy=Accuracy(**acc) if acc is not None else None,
            onnx_latency=Latency(**onnx_lat) if onnx_lat is not None else None,
        )
