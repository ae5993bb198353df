"""Carrying a :class:`Plan` out: prune, recover, write the ``.secz`` file once, reload it and
measure which limits the reloaded model meets."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..export import compressed_bytes, load_compressed, save_compressed
from ..measure import Latency, count_macs, count_params, measure_latencies
from ..pruning import prune_
from ..quantization import CodebookConfig, cluster_weights_
from ._budget import Budget, Figures, misses
from ._plan import MAX_SPARSITY, Plan, Recover, Score, check_spec, narrow_

#: Sparsity added per step when a recovered model's file comes out over the byte budget.
TIGHTEN_STEP = 0.005


@dataclass(frozen=True)
class PlanOutcome:
    """The planned model, recovered, written to ``path`` and reloaded from it (``model``).

    ``figures`` were measured on the reloaded model (``score`` by the caller's function,
    latency timed interleaved with the baseline, whose time is ``baseline_latency``); ``met``
    says for each set limit whether its figure is within it. ``sparsity`` is the final global
    sparsity target: above the plan's when recovery grew the file and it was tightened.
    """

    model: nn.Module
    path: Path
    figures: Figures
    baseline_latency: Latency
    met: dict[str, bool]
    sparsity: float


def apply_plan(
    model: nn.Module,
    plan: Plan,
    path: str | os.PathLike[str],
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    score: Score,
    recover: Recover | None = None,
    calibration: Any = None,
    latency_runs: int = 50,
    metadata: dict[str, Any] | None = None,
) -> PlanOutcome:
    """Carry ``plan`` out on a copy of ``model`` and write the result to ``path`` once.

    Structured pruning, then ``recover(m, None)``; weight pruning, then ``recover(m, masks)``;
    for a codebook coding, k-means clustering, then ``recover(m, codebooks)`` (centroid
    fine-tuning). If the encoded file is then over the byte budget (recovery moves the values),
    :data:`TIGHTEN_STEP` more of the weights are zeroed at a time until it fits (or
    :data:`MAX_SPARSITY` is reached), the weight stages are recovered once more at that
    sparsity, and, should the file have grown again, zeroed further without recovery. The file
    is written atomically, reloaded and measured; ``met`` tells which limits its figures meet. Pass the ``metadata`` that
    :func:`plan_for_budget` was given, so the header the probes counted is the one written.

    Raises:
        ConfigError: ``path`` does not end in ``.secz`` or the model has no spec (checked
            before any work).
        OutputError: the folder cannot be written.
    """
    target = Path(path)
    if target.suffix != ".secz":
        raise ConfigError(f"cannot write the planned model to {target}: name the file .secz")
    check_spec(model, "apply_plan")
    pruned = copy.deepcopy(model)
    if plan.ratio > 0:
        narrow_(pruned, plan.shape_method, plan.ratio, plan.structured, example_inputs, calibration)
        if recover is not None:
            recover(pruned, None)
    limit = plan.budget.max_file_bytes

    def over() -> bool:
        if limit is None:
            return False
        return len(compressed_bytes(pruned, plan.coding, metadata=metadata)) > limit

    def recover_weights(sparsity: float) -> None:
        """Weight pruning at ``sparsity`` with recovery under its masks, then codebooks."""
        if sparsity > 0:
            config = dataclasses.replace(plan.weights, sparsity=sparsity)
            masks = prune_(pruned, config, calibration=calibration)
            if recover is not None:
                recover(pruned, masks)
            masks.make_permanent()
        if plan.coding.values.value == "codebook" and recover is not None:
            books = cluster_weights_(
                pruned, CodebookConfig(bits=plan.coding.bits, per_layer=plan.coding.per_layer)
            )
            recover(pruned, books)

    def tighten(sparsity: float) -> float:
        """Zero more weights, no recovery, until the file fits; return the sparsity reached."""
        while over() and sparsity < MAX_SPARSITY:
            sparsity = min(MAX_SPARSITY, math.floor((sparsity + TIGHTEN_STEP) * 1000) / 1000)
            config = dataclasses.replace(plan.weights, sparsity=sparsity)
            prune_(pruned, config, calibration=calibration).make_permanent()
        return sparsity

    sparsity = plan.sparsity
    recover_weights(sparsity)
    if over():
        sparsity = tighten(sparsity)
        if recover is not None:  # one more recovery at the tightened sparsity, then re-check
            recover_weights(sparsity)
            sparsity = tighten(sparsity)
    save_compressed(pruned, target, plan.coding, metadata=metadata)
    device = next(model.parameters()).device
    restored = load_compressed(target, device=str(device)).model
    base_latency, latency = measure_latencies([model, restored], example_inputs, runs=latency_runs)
    total, nonzero = count_params(restored)
    figures = Figures(
        float(score(restored)),
        total,
        nonzero,
        count_macs(restored, example_inputs).dense,
        latency,
        target.stat().st_size,
        base_latency.median_ms / latency.median_ms,
    )
    met = {
        limit: not misses(limit, figures.value(limit), getattr(plan.budget, limit))
        for limit in Budget.limits()
        if getattr(plan.budget, limit) is not None
    }
    return PlanOutcome(restored, target, figures, base_latency, met, sparsity)
