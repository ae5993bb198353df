"""Top-1 accuracy of a classifier on a data split."""

from __future__ import annotations

import torch
from torch import nn

from .._progress import make_progress
from ..data import Split


def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int = 512,
    progress: bool = False,
    description: str = "evaluate",
) -> float:
    """Return top-1 accuracy in [0, 1] of ``model`` on ``split``, on the model's device.

    The model is put in eval mode and restored to its previous mode afterwards. ``model`` may
    also be any callable with ``training``/``eval()``/``train()`` and no ``parameters()``, e.g. a
    ``secateur.measure.OnnxRunner``: it is fed CPU batches.
    """
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad(), make_progress(enabled=progress) as bar:
            task = bar.add_task(description, total=len(split), status="")
            for x, y in split.batches(batch_size, shuffle=False, device=device):
                correct += int((model(x).argmax(dim=1) == y).sum())
                bar.update(task, advance=len(y))
    finally:
        model.train(was_training)
    return correct / max(1, len(split))
