"""Calibration data, as every data-driven stage accepts it (criteria, SparseGPT, sensitivity).

A calibration set is re-iterable and yields batches. A batch is either ``(inputs, targets)``,
a pair whose first item is what the model takes (a tensor, a tuple of tensors or a mapping of
keyword tensors, see :mod:`secateur._inputs`) and whose second item is a target tensor or
``None``, or bare ``inputs`` with no targets: a tensor or a mapping. A ``Split`` from
:mod:`secateur.data` may be passed as it is: it is read in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .errors import ConfigError

Batch = tuple[Any, torch.Tensor | None]


def iter_calibration(
    calibration: Any,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 128,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` pairs from ``calibration`` moved to ``device``.

    Raises:
        ConfigError: ``calibration`` is ``None`` or not one of the accepted forms.
    """
    if calibration is None:
        raise ConfigError(
            "this criterion needs calibration data: pass calibration=[(x, y), ...] or a data split"
        )
    if hasattr(calibration, "batches") and hasattr(calibration, "labels"):
        source: Iterable[Any] = calibration.batches(batch_size, shuffle=False)
    elif isinstance(calibration, (torch.Tensor, Mapping)):
        source = [calibration]
    elif isinstance(calibration, Iterable):
        source = calibration
    else:
        raise ConfigError(
            f"calibration must be a list of batches or a data split, not {type(calibration).__name__}"
        )
    for i, batch in enumerate(source):
        if max_batches is not None and i >= max_batches:
            return
        yield _to_device(_as_pair(batch), device)


def _as_pair(batch: Any) -> Batch:
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        "each calibration batch must be inputs (a tensor or a dict) or an (inputs, targets) pair"
    )


def _move(value: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


def _to_device(batch: Batch, device: torch.device | str | None) -> Batch:
    inputs, targets = batch
    return _move(inputs, device), _move(targets, device)
