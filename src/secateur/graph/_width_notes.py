"""Where a width is read: the int a reshape, split or slice used, the module whose code ran it,
the names that code refers to (attributes, and ``config.<name>`` reads found in its bytecode)
and the identifiers of the expression itself. Pruning rewrites only attributes these name."""

from __future__ import annotations

import ast
import dis
import functools
import linecache
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
    # the identifiers of the reshape's argument at the width's own axis (``C`` in
    # ``view(-1, self.window_area, C)``), None when the source does not say
    spelled_at: frozenset[str] | None = None
    # the reshape ran in a function the module's code called (timm's ``window_partition(x,
    # self.window_size)``): only what that call passes can have carried the width
    passed: bool = False
    # the entry at the width's axis is made only of locals read from a tensor's shape
    # (``B, N, C = x.shape``): it follows the pruned width by itself
    from_shape: bool = False


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


def expression_source(frame: Any) -> str:
    """The source of the expression ``frame`` is executing (e.g. ``x.view(b, t,
    self.num_heads, self.head_dim)``), or "" when it is not available."""
    try:
        positions = list(frame.f_code.co_positions())[frame.f_lasti // 2]
    except (AttributeError, IndexError):
        return ""
    first, last, start, end = positions
    if None in positions:
        return ""
    lines = [linecache.getline(frame.f_code.co_filename, n) for n in range(first, last + 1)]
    if not all(lines):
        return ""
    lines[-1] = lines[-1][:end]
    lines[0] = lines[0][start:]
    return "".join(lines)


# secateur's and torch's own folders (with the separator: torchvision is not torch)
_OURS = tuple(
    os.path.join(str(p), "") for p in (Path(__file__).parents[1], Path(torch.__file__).parent)
)


def calling_frame() -> Any:
    """The innermost frame outside secateur and torch running the op at hand, counting a
    comprehension or lambda as part of the code around it."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OURS):
        frame = frame.f_back
    while frame is not None and frame.f_code.co_name in _INLINE and frame.f_back:
        frame = frame.f_back
    return frame


_INLINE = frozenset({"<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>", "<lambda>"})


_PASS_THROUGH = {"LOAD_CONST", "BINARY_SUBSCR", "PRECALL", "CALL", "KW_NAMES", "CACHE"}


@functools.lru_cache(maxsize=1024)
def shape_locals(code: Any) -> frozenset[str]:
    """Locals of ``code`` assigned only from a tensor's shape: ``B, N, C = x.shape``,
    ``C = x.shape[-1]``, ``b, c, h, w = x.size()`` or ``c = x.size(1)``, found in its bytecode."""
    from_shape, other = set(), set()
    pending, unpacked = False, 0
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval in ("shape", "size"):
            pending, unpacked = True, 0
        elif ins.opname == "UNPACK_SEQUENCE" and pending:
            pending, unpacked = False, int(ins.argval)
        elif ins.opname == "STORE_FAST":
            (from_shape if pending or unpacked else other).add(ins.argval)
            pending, unpacked = False, max(unpacked - 1, 0)
        elif ins.opname not in _PASS_THROUGH:
            pending, unpacked = False, 0
    return frozenset(from_shape - other)


def spelled_names(source: str) -> frozenset[str]:
    """The identifiers in ``source``."""
    return frozenset(re.findall(r"[A-Za-z_]\w*", source))


_SHAPE_CALLS = frozenset({"view", "reshape"})


def names_at(source: str, axis: int, ndim: int) -> frozenset[str] | None:
    """The identifiers of the shape entry at ``axis`` when ``source`` is a ``view``/``reshape``
    call spelling all ``ndim`` entries (``x.view(b, n, C)``, ``x.reshape((b, n, C))``); None
    when it is not (a shape held in a variable, a starred entry, another call)."""
    try:
        call = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
        return None
    if call.func.attr not in _SHAPE_CALLS or call.keywords:
        return None
    entries = call.args
    if len(entries) == 1 and isinstance(entries[0], (ast.Tuple, ast.List)):
        entries = entries[0].elts
    if len(entries) != ndim or any(isinstance(e, ast.Starred) for e in entries):
        return None
    node = entries[axis]
    return frozenset(
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, (ast.Name, ast.Attribute))
    )


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
