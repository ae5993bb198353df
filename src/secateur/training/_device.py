"""Device choice: ``auto`` picks CUDA when present; an unavailable device is a user error."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda``/``cuda:N`` to a usable ``torch.device``.

    Raises:
        ConfigError: for an unknown name or a CUDA device that is not present.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}': use auto, cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{name}' requested but CUDA is not available: use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device '{name}': use auto, cpu or cuda[:N]")
    return device
