"""Where a width is read: the int a reshape, split or slice used, the module whose code ran it,
the names that code refers to (attributes, and ``config.<name>`` reads found in its bytecode)
and the identifiers of the expression itself. Pruning rewrites only attributes these name."""

from __future__ import annotations

import dis
import functools
import linecache
import re
import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._spaces import Layout


@dataclass(frozen=True)
class WidthNote:
    """An int seen in a module's reshape/split call that equals a prunable width: after
    pruning, attributes of ``module_name`` holding ``value`` get the new width of ``layout``."""

    module_name: str
    value: int
    layout: Layout
    names: frozenset[str] = frozenset()  # what the module's running code refers to
    spelled: frozenset[str] = frozenset()  # the identifiers in the reshape's own expression


def module_frames(module: nn.Module) -> list[Any]:
    """The frames on the call stack of methods called on ``module`` (their first argument,
    ``self`` by convention), innermost first."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and frame.f_locals.get(code.co_varnames[0]) is module:
            frames.append(frame)
        frame = frame.f_back
    return frames


def spelled_names(frame: Any) -> frozenset[str]:
    """The identifiers in the source of the expression ``frame`` is executing (e.g. ``view(b,
    t, self.num_heads, self.head_dim)``), or nothing when the source is not available."""
    try:
        positions = list(frame.f_code.co_positions())[frame.f_lasti // 2]
    except (AttributeError, IndexError):
        return frozenset()
    first, last, start, end = positions
    if None in positions:
        return frozenset()
    lines = [linecache.getline(frame.f_code.co_filename, n) for n in range(first, last + 1)]
    if not all(lines):
        return frozenset()
    lines[-1] = lines[-1][:end]
    lines[0] = lines[0][start:]
    return frozenset(re.findall(r"[A-Za-z_]\w*", "".join(lines)))


def names_in_use(frames: list[Any]) -> frozenset[str]:
    """Every name the code now running on a module refers to: ``co_names`` of ``frames``, the
    frames of methods called on the module (its forward, helpers it called, and functions
    that take it first, such as HF's attention functions).
    An attribute holding a width can only have reached a reshape through one of these, so an
    attribute that merely holds the same value (GPT-2's unused ``embed_dim`` beside its
    ``split_size``) is left alone. Empty when no such frame is found."""
    names: set[str] = set()
    for frame in frames:
        names.update(frame.f_code.co_names)
        names.update(_config_reads(frame.f_code))
    return frozenset(names)


@functools.lru_cache(maxsize=1024)
def _config_reads(code: Any) -> frozenset[str]:
    """``config.<name>`` for every ``<x>.config.<name>`` attribute read in ``code`` (Phi-3's
    ``self.config.num_attention_heads``), found in its bytecode: two attribute loads in a row."""
    reads, previous = set(), None
    for ins in dis.get_instructions(code):
        if ins.opname == "LOAD_ATTR" and previous == "config":
            reads.add(f"config.{ins.argval}")
        previous = ins.argval if ins.opname == "LOAD_ATTR" else None
    return frozenset(reads)
