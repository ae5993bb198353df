"""Calibration statistics that data-driven criteria read: gradients, diagonal Hessians and
per-feature activation statistics, gathered in one place so each is computed once per scoring.

Every statistic is measured with the model in eval mode (no dropout, BatchNorm on running
statistics) and the model's training mode and gradients are left as they were.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .._calibration import iter_calibration
from .._experts import ExpertFeatures, ExpertInputs
from .._inputs import call_model, split_inputs
from ..errors import ConfigError

LossFn = Callable[[Any, torch.Tensor | None], torch.Tensor]

#: The statistics a criterion may ask for.
NEEDS = ("taylor", "fisher", "hutchinson", "activations")


@dataclass
class FeatureStats:
    """Running sums over every position of one module's input (or output) features.

    ``sq_sum[j]``, ``abs_sum[j]`` and ``zeros[j]`` add up ``x²``, ``|x|`` and ``x == 0`` over the
    ``count`` positions (samples × tokens × pixels) at which feature ``j`` was seen.
    """

    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    zeros: torch.Tensor
    count: int = 0

    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all positions (what Wanda multiplies weights by)."""
        return self.sq_sum.sqrt()

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.count)

    def apoz(self) -> torch.Tensor:
        """Average percentage of zeros of each feature (Hu et al. 2016), in [0, 1]."""
        return self.zeros / max(1, self.count)


@dataclass
class Statistics:
    """What :func:`collect_statistics` measured; keys are parameter names (gradients) or module
    names (activations) of the scored model."""

    taylor: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    hutchinson: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, FeatureStats] = field(default_factory=dict)
    outputs: dict[str, FeatureStats] = field(default_factory=dict)
    experts: dict[str, ExpertFeatures] = field(default_factory=dict)


def default_loss(outputs: Any, targets: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of classifier logits; other outputs need a ``loss_fn`` of their own."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if targets is None or not isinstance(logits, torch.Tensor):
        raise ConfigError(
            "gradient criteria need a loss: give calibration batches as (inputs, targets) pairs "
            "of a classifier, or pass loss_fn=lambda outputs, targets: ..."
        )
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def feature_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(input feature dim, output feature dim)`` of a layer's activations, or None."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
        return -1, -1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return 1, 1
    return None


def collect_statistics(
    model: nn.Module,
    calibration: Any,
    needs: Iterable[str],
    *,
    params: Iterable[str] | None = None,
    loss_fn: LossFn | None = None,
    hutchinson_probes: int = 4,
    fisher_chunk: int = 32,
    max_batches: int | None = None,
    seed: int = 0,
) -> Statistics:
    """Measure the statistics named in ``needs`` (a subset of :data:`NEEDS`) over ``calibration``.

    - ``taylor``: ``Σ_batches |w ⊙ ∂L/∂w|`` per parameter (first-order Taylor, Molchanov 2017).
    - ``fisher``: the empirical Fisher diagonal ``mean_samples (∂ℓ_n/∂w)²`` from per-sample
      gradients (``torch.func``; a per-sample loop where vmap cannot run the model).
    - ``hutchinson``: the Hessian diagonal of the mean loss, ``E_z[z ⊙ Hz]`` with Rademacher
      ``z``, ``hutchinson_probes`` probes per batch, averaged over batches.
    - ``activations``: :class:`FeatureStats` of every Linear/Conv/Conv1D input and output, and
      per-expert input statistics of every stacked expert weight (``stats.experts``, keyed by
      parameter name; see :mod:`secateur._experts`).

    ``params`` limits gradient statistics to those parameter names (default: all that need grad).
    """
    needs = set(needs)
    unknown = needs - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    stats = Statistics()
    if not needs:
        return stats
    device = _device(model)
    loss_fn = loss_fn or default_loss
    named = dict(model.named_parameters())
    wanted = [n for n in (params if params is not None else named) if named[n].requires_grad]
    was_training = model.training
    model.eval()
    grads_before = {n: p.grad for n, p in named.items()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hooks = _activation_hooks(model, stats) if "activations" in needs else []
    experts = ExpertInputs(model) if "activations" in needs else None
    watching = experts if experts is not None and experts.params else contextlib.nullcontext()
    batches = samples = 0
    try:
        for inputs, targets in iter_calibration(
            calibration, device=device, max_batches=max_batches
        ):
            batches += 1
            with watching:  # not around vmap's per-sample gradients below
                if needs & {"taylor", "hutchinson"}:
                    _gradient_pass(
                        model,
                        named,
                        wanted,
                        inputs,
                        targets,
                        loss_fn,
                        needs,
                        stats,
                        hutchinson_probes,
                        generator,
                    )
                elif "activations" in needs:
                    with torch.no_grad():
                        call_model(model, inputs)
            if "fisher" in needs:
                samples += _fisher_pass(
                    model, named, wanted, inputs, targets, loss_fn, stats, fisher_chunk
                )
    finally:
        for handle in hooks:
            handle.remove()
        for n, p in named.items():
            p.grad = grads_before[n]
        model.train(was_training)
    if batches == 0:
        raise ConfigError("the calibration data holds no batch: pass at least one batch")
    for name in stats.fisher:
        stats.fisher[name] /= max(1, samples)
    for name in stats.hutchinson:
        stats.hutchinson[name] /= batches
    if experts is not None:
        stats.experts = {name: entry.filled() for name, entry in experts.features.items()}
        unseen = sorted(set(experts.params) - set(stats.experts))
        if unseen:
            warnings.warn(
                f"no calibration row reached the expert weights {', '.join(unseen)} through "
                "F.linear or grouped_mm, so they are scored without input statistics: load the "
                "model with experts_implementation='grouped_mm' or 'eager'",
                UserWarning,
                stacklevel=3,
            )
    return stats


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accumulate(table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    value = value.detach().float()
    table[name] = table[name] + value if name in table else value.clone()


def _gradient_pass(  # noqa: PLR0913
    model: nn.Module,
    named: dict[str, nn.Parameter],
    wanted: list[str],
    inputs: Any,
    targets: torch.Tensor | None,
    loss_fn: LossFn,
    needs: set[str],
    stats: Statistics,
    probes: int,
    generator: torch.Generator,
) -> None:
    params = [named[n] for n in wanted]
    loss = loss_fn(call_model(model, inputs), targets)
    second = "hutchinson" in needs
    grads = torch.autograd.grad(loss, params, create_graph=second, allow_unused=True)
    if "taylor" in needs:
        for name, p, g in zip(wanted, params, grads, strict=True):
            if g is not None:
                _accumulate(stats.taylor, name, (p.detach() * g.detach()).abs())
    if not second:
        return
    pairs = [(n, p, g) for n, p, g in zip(wanted, params, grads, strict=True) if g is not None]
    if not pairs:
        return
    for _ in range(probes):
        zs = [
            (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype)
            for _, p, _ in pairs
        ]
        hz = torch.autograd.grad(
            [g for _, _, g in pairs],
            [p for _, p, _ in pairs],
            zs,
            retain_graph=True,
            allow_unused=True,
        )
        for (name, _p, _g), z, h in zip(pairs, zs, hz, strict=True):
            if h is not None:
                _accumulate(stats.hutchinson, name, z * h / probes)


def _fisher_pass(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    wanted: list[str],
    inputs: Any,
    targets: torch.Tensor | None,
    loss_fn: LossFn,
    stats: Statistics,
    chunk: int,
) -> int:
    """Add Σ_n g_n² over the batch's samples, ``chunk`` samples per vmapped call; return how
    many samples there were."""
    size = _batch_size(inputs)
    for start in range(0, size, chunk):
        part = tree_map(lambda t, s=start: t[s : s + chunk], inputs)
        tpart = None if targets is None else targets[start : start + chunk]
        try:
            squares = _per_sample_squares_vmap(model, named, wanted, part, tpart, loss_fn)
        except Exception:  # models vmap cannot run (data-dependent control flow): loop instead
            squares = _per_sample_squares_loop(model, named, wanted, part, tpart, loss_fn)
        for name, value in squares.items():
            _accumulate(stats.fisher, name, value)
    return size


def _batch_size(inputs: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ConfigError("calibration inputs hold no tensor: pass tensors or a dict of tensors")
    return int(leaves[0].shape[0])


def _per_sample_squares_vmap(model, named, wanted, inputs, targets, loss_fn):  # noqa: ANN001, ANN202
    from torch.func import functional_call, grad, vmap

    params = {n: named[n].detach() for n in wanted}

    def one(p: dict[str, torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        args, kwargs = split_inputs(tree_map(lambda t: t.unsqueeze(0), x))
        out = functional_call(model, p, args, kwargs, strict=False)
        return loss_fn(out, None if y is None else y.unsqueeze(0))

    in_y = None if targets is None else 0
    per_sample = vmap(grad(one), in_dims=(None, 0, in_y), randomness="same")(
        params, inputs, targets
    )
    return {n: g.pow(2).sum(0) for n, g in per_sample.items()}


def _per_sample_squares_loop(model, named, wanted, inputs, targets, loss_fn):  # noqa: ANN001, ANN202
    params = [named[n] for n in wanted]
    out: dict[str, torch.Tensor] = {}
    for i in range(_batch_size(inputs)):
        x = tree_map(lambda t, i=i: t[i : i + 1], inputs)
        y = None if targets is None else targets[i : i + 1]
        grads = torch.autograd.grad(loss_fn(call_model(model, x), y), params, allow_unused=True)
        for name, g in zip(wanted, grads, strict=True):
            if g is not None:
                _accumulate(out, name, g.pow(2))
    return out


def _activation_hooks(model: nn.Module, stats: Statistics) -> list[Any]:
    handles = []
    for name, module in model.named_modules():
        dims = feature_dims(module)
        if dims is None or isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        in_dim, out_dim = dims

        def pre(mod: nn.Module, args: tuple, name: str = name, dim: int = in_dim) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                _add_features(stats.inputs, name, args[0], dim)

        def post(
            mod: nn.Module, args: tuple, out: Any, name: str = name, dim: int = out_dim
        ) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                _add_features(stats.outputs, name, out, dim)

        if not isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


@torch.no_grad()
def _add_features(table: dict[str, FeatureStats], name: str, x: torch.Tensor, dim: int) -> None:
    x = x.detach().float().movedim(dim, -1)
    flat = x.reshape(-1, x.shape[-1])
    sq, ab, zeros = flat.pow(2).sum(0), flat.abs().sum(0), (flat == 0).sum(0).float()
    entry = table.get(name)
    if entry is None or entry.sq_sum.shape != sq.shape:
        table[name] = FeatureStats(sq, ab, zeros, flat.shape[0])
        return
    entry.sq_sum += sq
    entry.abs_sum += ab
    entry.zeros += zeros
    entry.count += flat.shape[0]
