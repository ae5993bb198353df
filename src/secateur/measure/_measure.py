"""``measure``: one call that counts, runs and stats a model into a frozen :class:`Metrics`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data import Split
from ..training import evaluate
from ._latency import measure_latencies
from ._macs import count_macs
from ._metrics import Accuracy, Metrics
from ._onnx import OnnxRunner
from ._params import count_params, layer_sparsity


def measure(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    eval_split: Split | None = None,
    split_name: str = "test",
    saved_file: str | os.PathLike[str] | None = None,
    latency_runs: int | None = 50,
    latency_warmup: int = 10,
    eval_batch_size: int = 512,
    progress: bool = False,
    onnx_path: str | os.PathLike[str] | None = None,
) -> Metrics:
    """Measure ``model`` on the device its parameters live on.

    Args:
        model: any module; it is put in eval mode for the measurement and restored afterwards.
        example_inputs: one input batch (batch dimension first) on the model's device. Its batch
            size is the latency batch size; MACs are reported per sample.
        eval_split: if given, top-1 accuracy is measured on it and labelled ``split_name``.
        saved_file: if given, its size in bytes is recorded as ``disk_bytes``.
        latency_runs: timed runs (>= 20) after ``latency_warmup`` untimed ones; ``None`` skips
            timing (to time several models interleaved with ``measure_latencies`` instead).
        onnx_path: an ONNX file of the same model (e.g. from ``export_onnx``); if given and
            timing is on, it is opened in ONNX Runtime (CPU, as many threads as PyTorch) and
            timed interleaved with ``model`` into ``onnx_latency``.
        progress: draw progress bars for evaluation and timing.

    Returns:
        A :class:`Metrics` in which every figure was measured by this call.

    Example:
        >>> m = measure(nn.Linear(4, 2), torch.zeros(1, 4), latency_runs=20)
        >>> (m.params, m.macs)
        (10, 8)
    """
    total, nonzero = count_params(model)
    macs = count_macs(model, example_inputs)
    runner = OnnxRunner(onnx_path) if onnx_path is not None and latency_runs is not None else None
    accuracy = None
    if eval_split is not None:
        top1 = evaluate(model, eval_split, batch_size=eval_batch_size, progress=progress)
        accuracy = Accuracy(top1=top1, samples=len(eval_split), split=split_name)
    latencies = (
        []
        if latency_runs is None
        else measure_latencies(
            [model] if runner is None else [model, runner],
            example_inputs,
            runs=latency_runs,
            warmup=latency_warmup,
            progress=progress,
        )
    )
    return Metrics(
        params=total,
        nonzero_params=nonzero,
        macs=macs.dense,
        nonzero_macs=macs.nonzero,
        layers=layer_sparsity(model),
        latency=latencies[0] if latencies else None,
        disk_bytes=Path(saved_file).stat().st_size if saved_file is not None else None,
        accuracy=accuracy,
        onnx_latency=latencies[1] if len(latencies) > 1 else None,
    )
