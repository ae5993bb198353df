"""Unstructured pruning: zero the individually least important weights to a target sparsity."""

from __future__ import annotations

import enum
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._config import check_range, coerce_enum, config_from_dict, config_to_dict
from .._experts import as_rows, expert_stacks, from_rows, is_expert_stack
from ..errors import ConfigError
from ..importance import NORMALIZATIONS, create_criterion, normalize, weight_scores
from ..importance._statistics import LossFn
from ._layer_matrix import is_hf_conv1d
from ._masks import MaskSet

PRUNABLE_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class Scope(str, enum.Enum):
    """Where the threshold is drawn: one for all layers, or one per layer."""

    GLOBAL = "global"
    LAYER = "layer"


@dataclass(frozen=True)
class UnstructuredConfig:
    """Prune individual weights of Linear/Conv/Conv1D layers to ``sparsity``.

    Attributes:
        sparsity: fraction in [0, 1) of the selected weights to set to zero.
        scope: ``global`` ranks all selected weights together (layers end up with different
            sparsities); ``layer`` prunes each layer to ``sparsity`` on its own.
        criterion: a registered importance criterion name (see ``importance.list_criteria``);
            data criteria (``taylor``, ``obd``, ``wanda``, ...) need ``calibration=`` at prune time.
        exclude: fnmatch patterns of module names to leave dense, e.g. ``("fc3",)``.
        normalize: with global scope, divide each layer's scores by their ``mean``, ``max``,
            ``sum`` or ``l2`` norm before ranking them together (``none``: raw scores).
        per_layer: fnmatch pattern → sparsity for the layers it matches (the first matching
            pattern wins); those layers are pruned on their own, the rest as ``scope`` says.
        nm: ``"N:M"`` semi-structured sparsity: in every run of M consecutive weights along a
            layer's input features, only the N highest-scoring stay (``"2:4"`` is what sparse
            tensor cores run). It replaces ``sparsity``, which becomes ``1 - N/M``.
    """

    sparsity: float = 0.5
    scope: Scope = Scope.GLOBAL
    criterion: str = "magnitude"
    exclude: tuple[str, ...] = ()
    normalize: str = "none"
    per_layer: dict[str, float] = field(default_factory=dict)
    nm: str | None = None

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "scope", coerce_enum("scope", Scope, self.scope))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "per_layer", check_per_layer(self.per_layer))
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize={self.normalize!r} is not known: choose one of {', '.join(NORMALIZATIONS)}"
            )
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            object.__setattr__(self, "sparsity", 1.0 - n / m)
        create_criterion(self.criterion)  # validates the name now, not mid-run

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnstructuredConfig:
        return config_from_dict(cls, data)


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``; raises ConfigError unless ``0 < N < M``."""
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"nm={text!r} is not N:M: write e.g. '2:4' or '4:8'") from None
    if not 0 < n < m:
        raise ConfigError(f"nm={text!r} needs 0 < N < M: write e.g. '2:4' or '4:8'")
    return n, m


def check_per_layer(per_layer: Any) -> dict[str, float]:
    """Validate a ``{pattern: fraction}`` mapping (fractions in [0, 1))."""
    if not isinstance(per_layer, dict):
        raise ConfigError(
            f"per_layer must map layer name patterns to fractions, got {type(per_layer).__name__}"
        )
    for pattern, value in per_layer.items():
        check_range(f"per_layer[{pattern!r}]", value, 0.0, 1.0, high_open=True)
    return dict(per_layer)


def match_per_layer(names: list[str], per_layer: dict[str, float]) -> float | None:
    """The fraction of the first ``per_layer`` pattern matching any of ``names``, else None."""
    for pattern, value in per_layer.items():
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return value
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose ``weight`` unstructured pruning, codebooks and the
    compressed format treat as a kernel: Linear, Conv and HF ``Conv1D`` (GPT-2's projections,
    a Linear stored transposed)."""
    return isinstance(module, PRUNABLE_TYPES) or is_hf_conv1d(module)


def prunable_weights(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """``{parameter name: module}`` of every weight unstructured pruning reaches: the
    ``"<module>.weight"`` of each Linear/Conv/Conv1D and each stacked expert weight of a
    mixture-of-experts layer (``"<experts>.gate_up_proj"``, see :mod:`secateur._experts`).
    ``exclude`` patterns match module names, and parameter names too for expert stacks."""

    def excluded(*names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude)

    found = {
        f"{name}.weight" if name else "weight": module
        for name, module in model.named_modules()
        if is_weight_layer(module) and not excluded(name)
    }
    for param_name, (module_name, module) in expert_stacks(model).items():
        if not excluded(module_name, param_name):
            found[param_name] = module
    return found


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape with exactly its ``k`` lowest entries False."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        # stable sort breaks ties by position, so the count is exact and deterministic
        order = torch.sort(scores.flatten().float(), stable=True).indices
        keep[order[:k]] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, module: nn.Module, n: int, m: int, name: str) -> torch.Tensor:
    """Keep-mask keeping the ``n`` best of every ``m`` consecutive input weights of each row.

    Rows are output units; a Conv kernel's row is its ``in × k...`` slice (the layout sparse
    kernels use), an HF Conv1D (stored ``in × out``) is transposed first, and a stacked expert
    weight has one row per output unit of each expert.
    """
    if is_expert_stack(module, scores):
        rows = as_rows(module, scores)
    else:
        rows = scores.t() if is_hf_conv1d(module) else scores
        rows = rows.reshape(rows.shape[0], -1)
    if rows.shape[1] % m:
        raise ConfigError(
            f"{name} has {rows.shape[1]} inputs per row, not a multiple of {m}: "
            f"exclude it with exclude=[...] or use another N:M"
        )
    runs = rows.float().reshape(rows.shape[0], -1, m)
    best = runs.topk(n, dim=-1).indices
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, best, True).reshape(rows.shape)
    if is_expert_stack(module, scores):
        return from_rows(module, keep, scores.shape)
    return keep.t() if is_hf_conv1d(module) else keep.reshape(scores.shape)


def unstructured_masks(
    model: nn.Module,
    config: UnstructuredConfig,
    *,
    calibration: Any = None,
    loss_fn: LossFn | None = None,
    pruned: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Compute keep-masks for ``config`` without touching the model.

    Args:
        calibration: batches for data criteria (see ``secateur._calibration``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for gradient criteria (default:
            cross-entropy of the logits).
        pruned: earlier keep-masks; what they pruned stays pruned and counts toward the target,
            so masks only ever grow (gradual and iterative schedules).
    """
    layers = prunable_weights(model, config.exclude)
    if not layers:
        raise ConfigError(
            "no Linear, Conv or expert weights to prune: check the model and `exclude`"
        )
    criterion = create_criterion(config.criterion)
    scores = weight_scores(model, criterion, layers, calibration=calibration, loss_fn=loss_fn)
    pruned = pruned or {}

    def fixed(name: str, s: torch.Tensor) -> torch.Tensor:
        keep = pruned.get(name)
        return s if keep is None else s.masked_fill(~keep.to(s.device), -math.inf)

    if config.nm is not None:
        n, m = parse_nm(config.nm)
        return {k: nm_mask(fixed(k, s), layers[k], n, m, k) for k, s in scores.items()}
    masks: dict[str, torch.Tensor] = {}
    pooled = {}
    for name, s in scores.items():
        own = match_per_layer([name.rsplit(".", 1)[0], name], config.per_layer)
        if own is None and config.scope is Scope.LAYER:
            own = config.sparsity
        if own is None:
            pooled[name] = fixed(name, normalize(s, config.normalize))
        else:
            masks[name] = lowest_k_mask(fixed(name, s), round(own * s.numel()))
    if pooled:
        flat = torch.cat([s.flatten().float().cpu() for s in pooled.values()])
        keep = lowest_k_mask(flat, round(config.sparsity * flat.numel()))
        offset = 0
        for name, s in pooled.items():
            masks[name] = keep[offset : offset + s.numel()].view_as(s).to(s.device)
            offset += s.numel()
    return {name: masks[name] for name in scores}


def prune_unstructured_(
    model: nn.Module,
    config: UnstructuredConfig,
    *,
    calibration: Any = None,
    loss_fn: LossFn | None = None,
) -> MaskSet:
    """Zero the weights chosen by ``config`` in place and return their masks."""
    masks = unstructured_masks(model, config, calibration=calibration, loss_fn=loss_fn)
    return MaskSet(model, masks)
