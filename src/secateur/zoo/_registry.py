"""A timm-style registry of model factories, keyed by name.

Every model built through a registered factory carries ``secateur_spec``, a JSON-able dict from
which :func:`create_model` rebuilds the same architecture (weights are saved separately).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any, TypeVar

from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def _plain(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers, so that ``secateur_spec`` stays JSON-able."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    return value


def register_model(name: str) -> Callable[[F], F]:
    """Register a model factory under ``name``.

    The factory must take keyword-only arguments, each with a default, and return an
    ``nn.Module``. The decorated factory rejects unknown keywords with :class:`ConfigError` and
    sets ``model.secateur_spec = {"name": name, "kwargs": {...every argument...}}`` on what it
    returns, whether called directly or through :func:`create_model`.

    Raises:
        ValueError: ``name`` is already registered or the factory's signature breaks the rules
            above (a programming error, not a user error).

    Example:
        >>> @register_model("tiny_mlp")
        ... def tiny_mlp(*, in_channels=1, num_classes=10, image_size=28):
        ...     return nn.Linear(in_channels * image_size**2, num_classes)
    """

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        signature = inspect.signature(factory)
        for param in signature.parameters.values():
            if param.kind is not param.KEYWORD_ONLY or param.default is param.empty:
                raise ValueError(
                    f"factory of {name!r}: parameter {param.name!r} must be keyword-only "
                    "with a default"
                )
        options = tuple(signature.parameters)

        @functools.wraps(factory)
        def build(**kwargs: Any) -> nn.Module:
            for key in kwargs:
                if key not in options:
                    raise ConfigError(
                        f"model {name!r} has no option {key!r}: use one of {', '.join(options)}"
                    )
            bound = signature.bind(**{k: _plain(v) for k, v in kwargs.items()})
            bound.apply_defaults()
            model = factory(**bound.arguments)
            model.secateur_spec = {"name": name, "kwargs": dict(bound.arguments)}
            return model

        _REGISTRY[name] = build
        return build  # type: ignore[return-value]

    return decorate


def list_models() -> list[str]:
    """Names of all registered models, sorted.

    The families built by prefix are not listed: ``torchvision.<arch>`` (vision extra) and
    ``hf.<model_type>`` (hf extra); :func:`create_model`'s unknown-name error names them.

    Example:
        >>> "resnet20" in list_models()
        True
    """
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with the given keyword options.

    Args:
        name: a name from :func:`list_models`, ``torchvision.<arch>`` or ``hf.<model_type>``.
        **kwargs: the factory's options, typically ``in_channels``, ``num_classes`` and
            ``image_size`` (and ``width_mult`` for VGG). ``torchvision.<arch>`` takes
            ``torchvision.models.get_model``'s options; ``hf.<model_type>`` takes ``task``
            (``"base"``, ``"causal-lm"``, ``"masked-lm"`` or ``"sequence-classification"``,
            default ``"base"``) and ``transformers.AutoConfig.for_model``'s options.

    Returns:
        A freshly initialised ``nn.Module`` with a ``secateur_spec`` attribute; rebuilding from
        it, ``create_model(spec["name"], **spec["kwargs"])``, gives the same architecture.

    Raises:
        ConfigError: unknown name, unknown option, or an option value out of range.

    Example:
        >>> model = create_model("lenet5", in_channels=1, num_classes=10, image_size=28)
        >>> model.secateur_spec["kwargs"]
        {'in_channels': 1, 'num_classes': 10, 'image_size': 28}
    """
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name, kwargs)
    if name.startswith(HF_PREFIX):
        from ._hf import hf_model  # imports transformers only when asked for

        return hf_model(name, kwargs)
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown model {name!r}: choose one of {', '.join(list_models())} "
            f"or {TORCHVISION_PREFIX}<name> (with the vision extra) "
            f"or {HF_PREFIX}<model_type> (with the hf extra)"
        )
    return factory(**kwargs)


TORCHVISION_PREFIX = "torchvision."
HF_PREFIX = "hf."  # built in ._hf


def _torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A torchvision architecture built from its config with random weights (never downloaded)."""
    try:
        import torchvision
    except ImportError:
        raise ConfigError(
            f"model {name!r} needs torchvision: pip install 'secateur[vision]'"
        ) from None
    arch = name[len(TORCHVISION_PREFIX) :]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"unknown torchvision classifier {arch!r}: see torchvision.models.list_models()"
        )
    if "weights" in kwargs:
        raise ConfigError(
            "torchvision weights are never downloaded: load your own state dict instead"
        )
    try:
        model = torchvision.models.get_model(arch, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for {name}: {exc}") from None
    model.secateur_spec = {"name": name, "kwargs": {k: _plain(v) for k, v in kwargs.items()}}
    return model


def check_positive_int(option: str, value: Any, hint: str) -> int:
    """Return ``value`` as an int if it is an integer >= 1, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"{option} must be a positive integer, got {value!r}: {hint}")
    return int(value)


def check_common(in_channels: Any, num_classes: Any, image_size: Any) -> tuple[int, int, int]:
    """Validate the options every factory takes; return them as ints."""
    return (
        check_positive_int("in_channels", in_channels, "pass 1 for grayscale or 3 for RGB images"),
        check_positive_int("num_classes", num_classes, "pass the number of classes, e.g. 10"),
        check_positive_int("image_size", image_size, "pass the image side, e.g. 28 or 32"),
    )


def check_width_mult(value: Any) -> float:
    """Validate a width multiplier: a finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"width_mult must be a positive number, got {value!r}: pass e.g. 0.5")
    return float(value)
