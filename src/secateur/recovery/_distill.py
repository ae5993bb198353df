"""Knowledge distillation from an unpruned teacher (Hinton et al. 2015; FitNets, Romero et al. 2015).

Two entry points:

* :func:`distill` trains a classifier student with the training loop of :mod:`secateur.training`
  on soft teacher targets, hard labels and, optionally, intermediate feature maps matched through
  learned adapters where the student is narrower than the teacher.
* :func:`distill_embeddings` pulls the embeddings of a student (e.g. a pruned sentence
  transformer) towards its teacher's on unlabelled batches, for a number of steps or seconds.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._calibration import iter_calibration
from .._config import check_range, coerce_enum, config_from_dict, config_to_dict
from .._embed import EmbedFn, default_embed
from .._progress import make_progress
from ..data import DataSplits
from ..errors import ConfigError
from ..pruning import MaskSet
from ..training import EpochRecord, LRSchedule, TrainConfig, fit

FeaturePair = tuple[str, str]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`; validated on construction (``ConfigError`` names the field).

    Attributes:
        temperature: softens both distributions before the KL term; > 0.
        alpha: weight of the soft (KL) term in [0, 1]; ``1 - alpha`` weights the hard
            cross-entropy on the labels.
        features: ``(student module name, teacher module name)`` pairs whose outputs are
            matched by mean squared error (through an adapter where the widths differ).
        feature_weight: weight of the summed feature terms; >= 0.

    Example:
        >>> DistillConfig(temperature=2.0, features=[["features", "features"]]).features
        (('features', 'features'),)
    """

    temperature: float = 4.0
    alpha: float = 0.9
    features: tuple[FeaturePair, ...] = ()
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0, low_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("feature_weight", self.feature_weight, 0.0)
        object.__setattr__(self, "features", _feature_pairs(self.features))

    def to_dict(self) -> dict[str, Any]:
        out = config_to_dict(self)
        out["features"] = [list(pair) for pair in self.features]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        return config_from_dict(cls, data)


def _feature_pairs(value: Any) -> tuple[FeaturePair, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(
            f"features={value!r} must be a list of [student module, teacher module] pairs"
        )
    pairs = []
    for pair in value:
        if (
            isinstance(pair, (str, bytes))
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(name, str) and name for name in pair)
        ):
            raise ConfigError(
                f"features entry {pair!r} must be a pair of module names, e.g. "
                "['layer3', 'layer3'] (student first, teacher second)"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton's loss: ``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    Args:
        student_logits, teacher_logits: ``(B, K)`` logits of one batch.
        targets: ``(B,)`` class indices.
        temperature: ``T`` > 0; the ``T²`` factor keeps the soft gradients' scale independent
            of ``T``.
        alpha: weight of the soft term in [0, 1].

    Returns:
        A scalar; the KL term is averaged over the batch (summed over classes), the
        cross-entropy averaged over the batch. A term whose weight is 0 is not computed.

    Example:
        >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> float(distillation_loss(s, t, torch.tensor([0, 1]), temperature=4.0, alpha=1.0))
        0.0
    """
    loss = student_logits.new_zeros(())
    if alpha > 0:
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
        loss = loss + (1 - alpha) * ce
    return loss


# --- feature matching --------------------------------------------------------------------------


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"{role} has no module named '{name}': pass a name from {role}.named_modules()"
        ) from None


def check_feature_names(
    student: nn.Module, teacher: nn.Module, features: Sequence[FeaturePair]
) -> None:
    """Raise ``ConfigError`` naming the first feature module missing from its model."""
    for student_name, teacher_name in features:
        _module(student, student_name, "student")
        _module(teacher, teacher_name, "teacher")


def _as_tensor(output: Any, name: str) -> torch.Tensor:
    """The feature a module produced: its output, or the first item of a tuple output."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ConfigError(
            f"module '{name}' returns {type(output).__name__}, not a tensor: match a module "
            "whose output is a tensor"
        )
    return output


def _channel_dim(feature: torch.Tensor) -> int:
    """Channels are dim 1 of a 4-D map (N, C, H, W) and the last dim of anything else."""
    return 1 if feature.dim() == 4 else feature.dim() - 1


class _Capture:
    """Forward hooks that keep the latest output of named modules; removed by :meth:`remove`."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name in dict.fromkeys(names):
            module = _module(model, name, role)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = _as_tensor(output, name)

        return hook

    def take(self, name: str) -> torch.Tensor:
        return self.outputs.pop(name)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.outputs.clear()


def _adapter(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, pair: FeaturePair
) -> nn.Module | None:
    """A learned linear map from the student's channel width to the teacher's, or ``None``
    where the widths already agree. Raises ``ConfigError`` if the other dims differ."""
    s_shape, t_shape = list(student_feature.shape), list(teacher_feature.shape)
    dim = _channel_dim(student_feature)
    if len(s_shape) != len(t_shape) or s_shape[:dim] + s_shape[dim + 1 :] != (
        t_shape[:dim] + t_shape[dim + 1 :]
    ):
        raise ConfigError(
            f"feature pair {list(pair)}: student output {tuple(s_shape)} and teacher output "
            f"{tuple(t_shape)} differ beyond the channel dim: match modules of equal spatial size"
        )
    if s_shape[dim] == t_shape[dim]:
        return None
    if student_feature.dim() == 4:
        return nn.Conv2d(s_shape[dim], t_shape[dim], 1, bias=False)
    return nn.Linear(s_shape[dim], t_shape[dim], bias=False)


class _FeatureMatcher(nn.Module):
    """Hooks on both models plus one adapter per pair (``Identity`` where widths agree)."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, features: Sequence[FeaturePair]
    ) -> None:
        super().__init__()
        self.pairs = list(features)
        check_feature_names(student, teacher, self.pairs)
        self.student_hooks = _Capture(student, [s for s, _ in self.pairs], "student")
        self.teacher_hooks = _Capture(teacher, [t for _, t in self.pairs], "teacher")
        self.adapters = nn.ModuleList()

    def build_adapters(self, student: nn.Module, teacher: nn.Module, probe: torch.Tensor) -> None:
        """Run both models once on ``probe`` to learn the widths, and create the adapters."""
        modes = student.training, teacher.training
        student.eval()
        teacher.eval()
        try:
            with torch.no_grad():
                student(probe)
                teacher(probe)
            device = probe.device
            for pair in self.pairs:
                adapter = _adapter(
                    self.student_hooks.outputs[pair[0]], self.teacher_hooks.outputs[pair[1]], pair
                )
                self.adapters.append(nn.Identity() if adapter is None else adapter.to(device))
        finally:
            student.train(modes[0])
            teacher.train(modes[1])
            self.student_hooks.outputs.clear()
            self.teacher_hooks.outputs.clear()

    def loss(self) -> torch.Tensor:
        """Sum over pairs of the MSE between adapted student and teacher features of the
        last forward passes; consumes them."""
        student = {s: self.student_hooks.outputs.get(s) for s, _ in self.pairs}
        teacher = {t: self.teacher_hooks.outputs.get(t) for _, t in self.pairs}
        self.student_hooks.outputs.clear()
        self.teacher_hooks.outputs.clear()
        total = None
        for (s, t), adapter in zip(self.pairs, self.adapters, strict=True):
            s_feat, t_feat = student[s], teacher[t]
            if s_feat is None or t_feat is None:
                raise ConfigError(
                    f"feature pair {[s, t]} was not computed in the forward pass: match modules "
                    "that run on every input"
                )
            term = F.mse_loss(adapter(s_feat), t_feat.detach())
            total = term if total is None else total + term
        assert total is not None
        return total

    def remove(self) -> None:
        self.student_hooks.remove()
        self.teacher_hooks.remove()


def _check_same_device(student: nn.Module, teacher: nn.Module) -> torch.device:
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    if teacher_device != device:
        raise ConfigError(
            f"teacher is on {teacher_device} but the student on {device}: move both to one "
            "device with .to(device)"
        )
    return device


@contextlib.contextmanager
def _teacher_eval(teacher: nn.Module) -> Iterator[None]:
    was_training = teacher.training
    teacher.eval()
    try:
        yield
    finally:
        teacher.train(was_training)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: DataSplits,
    train: TrainConfig,
    config: DistillConfig,
    masks: MaskSet | None = None,
    *,
    progress: bool = True,
) -> list[EpochRecord]:
    """Train ``student`` in place on ``data.train`` to imitate ``teacher`` (left unchanged).

    Per batch the loss is ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−alpha)·CE(s, y)
    + feature_weight·Σ MSE(adapter(student feature), teacher feature)``. The teacher runs on
    the same batch in eval mode without gradients. For each feature pair whose channel widths
    differ (dim 1 of 4-D maps, the last dim otherwise), a 1×1 conv (4-D) or a Linear maps the
    student's width to the teacher's; the adapters train with the student (same optimizer) and
    are discarded afterwards. Forward hooks are removed on return, error or not.

    Args:
        student, teacher: classifiers taking ``(B, C, H, W)`` images and returning ``(B, K)``
            logits, their parameters on one device.
        data: the splits; training reads ``data.train``, per-epoch validation ``data.val``.
        train: optimizer and schedule settings of :func:`secateur.training.fit`.
        masks: keeps the student's pruned weights exactly zero throughout, as in
            :func:`secateur.recovery.finetune`.

    Returns:
        One :class:`~secateur.training.EpochRecord` per epoch (train loss is the total loss).

    Raises:
        ConfigError: a feature module does not exist (named), its output is not a tensor, a
            pair's shapes differ beyond the channel dim, or the models sit on different devices.

    Example:
        >>> distill(small, big, data, TrainConfig(epochs=2), DistillConfig(temperature=4.0))
        [EpochRecord(epoch=1, ...), EpochRecord(epoch=2, ...)]
    """
    device = _check_same_device(student, teacher)
    matcher = _FeatureMatcher(student, teacher, config.features) if config.features else None
    try:
        if matcher is not None:
            matcher.build_adapters(student, teacher, data.train.images[:2].to(device))

        def loss_fn(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = distillation_loss(
                logits,
                teacher_logits,
                y,
                temperature=config.temperature,
                alpha=config.alpha,
                label_smoothing=train.label_smoothing,
            )
            if matcher is not None:
                loss = loss + config.feature_weight * matcher.loss()
            return loss

        with _teacher_eval(teacher):
            return fit(
                student,
                data,
                train,
                constraint=masks,
                loss_fn=loss_fn,
                extra_parameters=list(matcher.parameters()) if matcher is not None else [],
                description="distill",
                progress=progress,
            )
    finally:
        if matcher is not None:
            matcher.remove()


# --- embeddings --------------------------------------------------------------------------------


class EmbeddingLoss(str, enum.Enum):
    """How :func:`distill_embeddings` compares student and teacher embeddings."""

    COSINE = "cosine"  # 1 - cosine similarity, averaged over the batch
    MSE = "mse"  # mean squared error over all entries


def schedule_factor(schedule: LRSchedule, done: float) -> float:
    """The multiplier of the peak learning rate once ``done`` (0 to 1, clamped) of a budget is
    spent: 1 for ``constant``; a half-cosine from 1 to 0 for ``cosine``; for ``onecycle``, as
    :class:`torch.optim.lr_scheduler.OneCycleLR` with its defaults, a cosine rise from 1/25 to 1
    over the first 30% and a cosine fall to 1/25e4 over the rest."""
    done = min(max(done, 0.0), 1.0)
    if schedule is LRSchedule.CONSTANT:
        return 1.0
    if schedule is LRSchedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * done))
    start, end, rise = 1 / 25, 1 / 25e4, 0.3
    if done <= rise:
        return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * done / rise))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (done - rise) / (1 - rise)))


def _budget_fraction(
    step: int, steps: int | None, elapsed: float, max_seconds: float | None
) -> float:
    """How much of the budget is spent: the larger of the step and the time fractions."""
    parts = [0.0]
    if steps is not None:
        parts.append(step / steps)
    if max_seconds is not None:
        parts.append(elapsed / max_seconds)
    return max(parts)


def _embedding_loss(
    kind: EmbeddingLoss, student: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    if student.shape != teacher.shape:
        raise ConfigError(
            f"student embeddings {tuple(student.shape)} and teacher embeddings "
            f"{tuple(teacher.shape)} differ in shape: keep the output width when pruning"
        )
    if kind is EmbeddingLoss.COSINE:
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def _cycle(batches: Any, device: torch.device) -> Iterator[tuple[int, Any]]:
    """``(position in the pass, inputs)`` of ``batches``, over and over; an empty pass is an
    error, not a hang."""
    while True:
        empty = True
        for position, (inputs, _) in enumerate(iter_calibration(batches, device=device)):
            empty = False
            yield position, inputs
        if empty:
            raise ConfigError(
                "batches yielded no batch: pass a list of input batches (a generator can only "
                "be read once)"
            )


def distill_embeddings(
    student: nn.Module,
    teacher: nn.Module,
    batches: Any,
    *,
    steps: int | None = None,
    max_seconds: float | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    embed: EmbedFn | None = None,
    loss: EmbeddingLoss | str = "cosine",
    masks: MaskSet | None = None,
    lr_schedule: LRSchedule | str = "cosine",
    train_mode: bool = False,
    cache_teacher: bool = True,
    progress: bool = True,
) -> list[float]:
    """Train ``student`` in place so that its embeddings match ``teacher``'s (no labels).

    AdamW (``lr``, ``weight_decay``) on the student's parameters. The teacher runs in eval mode
    without gradients. Batches are read in order and cycled until ``steps`` optimizer steps were
    made or ``max_seconds`` have passed (checked before each step; the first step is always
    made), whichever comes first.

    By default the student also runs in eval mode during the steps (``train_mode=False``): no
    dropout and frozen batch-norm statistics, so it is fitted as it will be used. On a pruned
    sentence transformer this recovers far more per step than training with dropout (see
    ``benchmarks/RESULTS.md``). Its mode is restored afterwards either way.

    The learning rate follows ``lr_schedule`` (see :func:`schedule_factor`): ``"cosine"``
    (default), a half-cosine from ``lr`` to 0 over the budget, ``"onecycle"`` or
    ``"constant"``. Progress through the budget is the larger of ``step / steps`` and
    ``elapsed / max_seconds``, so a wall-clock budget anneals too.

    With ``cache_teacher`` (default) and ``batches`` a list or tuple, each batch's teacher
    embedding is computed on the first pass only and reused on later ones (the teacher is in
    eval mode, so it would give the same values again): from the second pass on a step costs
    the student alone. The batches must not change during the call.

    Args:
        batches: calibration-style batches (see :mod:`secateur._calibration`): a list of inputs
            (tensor, tuple or dict such as a tokenizer's output) or ``(inputs, targets)`` pairs
            whose targets are ignored; moved to the student's device.
        embed: ``embed(model, inputs) -> (B, D)`` tensor; default :func:`default_embed`.
        loss: ``"cosine"`` (1 − cosine similarity) or ``"mse"``.
        masks: keeps the student's pruned weights exactly zero throughout.
        lr_schedule: ``"cosine"``, ``"onecycle"`` or ``"constant"``.
        train_mode: run the student in train mode (dropout on) during the steps.
        cache_teacher: reuse the teacher's embeddings after the first pass over a list.

    Returns:
        The loss of every step, in order.

    Raises:
        ConfigError: neither ``steps`` nor ``max_seconds`` given, a value out of range, an
            empty ``batches``, embeddings of different shapes, or models on different devices.

    Example:
        >>> losses = distill_embeddings(pruned, original, tokenized_batches, max_seconds=600)
        >>> losses[-1] < losses[0]
        True
    """
    if steps is None and max_seconds is None:
        raise ConfigError("distill_embeddings needs steps=N or max_seconds=S (or both)")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps={steps!r} must be an integer >= 1")
    if max_seconds is not None:
        check_range("max_seconds", max_seconds, 0.0, low_open=True)
    check_range("lr", lr, 0.0, low_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    kind = coerce_enum("loss", EmbeddingLoss, loss)
    schedule = coerce_enum("lr_schedule", LRSchedule, lr_schedule)
    embed = embed or default_embed
    device = _check_same_device(student, teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    was_training = student.training
    held = masks.hold(optimizer) if masks is not None else contextlib.nullcontext()
    source = _cycle(batches, device)
    cache: dict[int, torch.Tensor] | None = (
        {} if cache_teacher and isinstance(batches, (list, tuple)) else None
    )
    start = time.perf_counter()
    student.train(train_mode)
    try:
        with held, _teacher_eval(teacher), make_progress(enabled=progress) as bar:
            task = bar.add_task("distill embeddings", total=steps, status="")
            while steps is None or len(losses) < steps:
                elapsed = time.perf_counter() - start
                if losses and max_seconds is not None and elapsed >= max_seconds:
                    break
                done = _budget_fraction(len(losses), steps, elapsed, max_seconds)
                for group in optimizer.param_groups:
                    group["lr"] = schedule_factor(schedule, done) * lr
                position, inputs = next(source)
                target = cache.get(position) if cache is not None else None
                if target is None:
                    with torch.no_grad():
                        target = embed(teacher, inputs)
                    if cache is not None:
                        cache[position] = target
                value = _embedding_loss(kind, embed(student, inputs), target)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                losses.append(value.item())
                bar.update(task, advance=1, status=f"loss {losses[-1]:.4f}, {elapsed:.0f} s")
    finally:
        student.train(was_training)
    return losses
