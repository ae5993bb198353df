"""Latency of PyTorch forward passes (and of ONNX Runtime sessions), measured here and now.

Machines are noisy, so models that will be compared are timed *interleaved*: run i of every model
happens before run i+1 of any, and a burst of load from elsewhere hits all of them alike.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from .._progress import make_progress
from ..errors import ConfigError
from ._metrics import Latency
from ._onnx import OnnxRunner

MIN_RUNS = 20

Inputs = torch.Tensor | Sequence[torch.Tensor]


def _as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runtime(model: nn.Module | OnnxRunner, device: torch.device) -> tuple[str, int, str]:
    """(runtime, threads, device) that a :class:`Latency` of ``model`` reports."""
    if isinstance(model, OnnxRunner):
        return model.runtime, model.threads, model.device
    return f"pytorch {torch.__version__} eager", torch.get_num_threads(), str(device)


def measure_latencies(
    models: Sequence[nn.Module | OnnxRunner],
    example_inputs: Inputs,
    *,
    runs: int = 50,
    warmup: int = 10,
    progress: bool = False,
) -> list[Latency]:
    """Time ``model(*example_inputs)`` for each model, interleaved, in eval mode, no grad.

    Runs ``warmup`` untimed rounds, then ``runs`` timed rounds (at least 20); one round calls each
    model once, in a fresh (seeded) random order, so no model keeps a place or a predecessor. CUDA
    is synchronised around every call. Inputs and models must share a device; an
    :class:`OnnxRunner` takes any (CUDA inputs are copied to the host inside its timed call).
    Returns one :class:`Latency` per model, with batch size, threads, device and runtime: for a
    runner, its own runtime string (e.g. ``onnxruntime 1.31.1 CPUExecutionProvider``), threads
    and device.

    Raises:
        ConfigError: if ``runs`` < 20 or ``warmup`` < 0.
    """
    if runs < MIN_RUNS:
        raise ConfigError(f"latency runs={runs} is too few: use at least {MIN_RUNS}")
    if warmup < 0:
        raise ConfigError(f"latency warmup={warmup} must be >= 0")
    inputs = _as_tuple(example_inputs)
    device = inputs[0].device
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    shuffler = random.Random(0)  # seeded: the same orders on every call
    try:
        for m in models:
            m.eval()
        with torch.no_grad(), make_progress(enabled=progress) as bar:
            task = bar.add_task("time latency", total=warmup + runs, status="")
            for i in range(warmup + runs):
                bar.update(task, advance=1)
                # a fresh order each round: a model timed right after a sibling (same runtime,
                # same code paths) ran up to 38% faster than after another runtime, and always
                # going first cost ~1-5%, so no model may keep a place or a predecessor
                order = list(range(len(models)))
                shuffler.shuffle(order)
                for k in order:
                    model = models[k]
                    _sync(device)
                    start = time.perf_counter()
                    model(*inputs)
                    _sync(device)
                    if i >= warmup:
                        times[k].append((time.perf_counter() - start) * 1e3)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    out = []
    for model, samples in zip(models, times, strict=True):
        runtime, threads, where = _runtime(model, device)
        samples.sort()
        out.append(
            Latency(
                median_ms=statistics.median(samples),
                p90_ms=samples[min(len(samples) - 1, int(0.9 * len(samples)))],
                runs=runs,
                warmup=warmup,
                batch_size=int(inputs[0].shape[0]) if inputs[0].dim() else 1,
                threads=threads,
                device=where,
                runtime=runtime,
            )
        )
    return out


def measure_latency(
    model: nn.Module, example_inputs: Inputs, *, runs: int = 50, warmup: int = 10
) -> Latency:
    """:func:`measure_latencies` for a single model."""
    return measure_latencies([model], example_inputs, runs=runs, warmup=warmup)[0]
