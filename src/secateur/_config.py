"""Helpers shared by every frozen config: range checks and a strict JSON/YAML dict round trip."""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")


def check_range(
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` lies in the stated interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name}={value!r} must be a number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        hi = "inf" if high == math.inf else f"{high:g}"
        raise ConfigError(f"{name}={value!r} is out of range: allowed {left}{low:g}, {hi}{right}")


def check_int(name: str, value: int, low: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def coerce_enum(name: str, enum_type: type[enum.Enum], value: Any) -> enum.Enum:
    """Accept an enum member or its string value; anything else names the allowed values."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum_type)
        raise ConfigError(f"{name}={value!r} is not allowed: choose one of {allowed}") from None


def split_names(value: Any) -> tuple[str, ...]:
    """Names given as a list/tuple or as one comma-separated string (``"a, b"``), stripped;
    ``()`` for anything else, so the caller's check for "at least one" says what is wrong."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(","))
    if isinstance(value, list | tuple):
        return tuple(str(v) if not isinstance(v, enum.Enum) else v.value for v in value)
    return ()


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a config dataclass (enums become their values)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = [v.value if isinstance(v, enum.Enum) else v for v in value]
        out[f.name] = value
    return out


def config_from_dict(cls: type[C], data: Any) -> C:
    """Build ``cls`` from a dict, rejecting unknown keys; validation runs in ``__post_init__``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {', '.join(unknown)}: allowed {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
