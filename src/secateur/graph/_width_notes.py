"""Where a width is read: the int a reshape, split or slice used, the module whose code ran it,
the names that code refers to (attributes, and ``config.<name>`` reads found in its bytecode)
and the identifiers of the expression itself. Pruning rewrites only attributes these name."""

from __future__ import annotations

import ast
import dis
import functools
import itertools
import linecache
import os
import re
import sys
import types
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
    # the width is entry ``entry`` of the sizes a split was given (InceptionNeXt's
    # ``split(x, self.split_indexes)``) or of a shape a reshape was given whole (timm's
    # ``view(self.bias_shape)``): an attribute holding all of ``sizes`` that the call names
    # is rewritten whole; ``(width,)`` for the one size of ``split(k)``
    sizes: tuple[int, ...] = ()
    entry: int = -1


def module_frames(module: nn.Module) -> list[Any]:
    """The frames on the call stack of methods called on ``module`` (their first argument,
    ``self`` by convention), innermost first."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        ours = code.co_filename.startswith(_SECATEUR)  # its own calls take the model first
        if code.co_argcount and not ours and frame.f_locals.get(code.co_varnames[0]) is module:
            frames.append(frame)
        frame = frame.f_back
    return frames


def expression_source(frame: Any) -> str:
    """The source of the expression ``frame`` is executing (e.g. ``x.view(b, t,
    self.num_heads, self.head_dim)``), or "" when it is not available (Python 3.10 has no
    ``co_positions``; code from ``exec`` has no file)."""
    try:  # the instruction's own entry, without listing them all
        positions = next(itertools.islice(frame.f_code.co_positions(), frame.f_lasti // 2, None))
    except (AttributeError, StopIteration):
        return ""
    first, last, start, end = positions
    if None in positions:
        return ""
    lines = [linecache.getline(frame.f_code.co_filename, n) for n in range(first, last + 1)]
    if not all(lines):
        return ""
    raw = [line.encode() for line in lines]  # the columns count UTF-8 bytes
    raw[-1] = raw[-1][:end]
    raw[0] = raw[0][start:]
    return b"".join(raw).decode(errors="replace")


# secateur's and torch's own folders (with the separator: torchvision is not torch)
_SECATEUR = os.path.join(str(Path(__file__).parents[1]), "")
_OURS = (_SECATEUR, os.path.join(str(Path(torch.__file__).parent), ""))


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


_PASS_THROUGH = {"BINARY_SUBSCR", "PRECALL", "KW_NAMES", "CACHE", "PUSH_NULL"}
_CALLS = {"CALL", "CALL_METHOD", "CALL_FUNCTION", "CALL_KW"}


@functools.lru_cache(maxsize=1024)
def shape_locals(code: Any) -> dict[str, tuple[int, int | None]]:
    """Locals of ``code`` assigned only from a tensor's shape (``B, N, C = x.shape``,
    ``C = x.shape[-1]``, ``b, c, h, w = x.size()``, ``c = x.size(1)``), each with the offset of
    the instruction that read the shape and which entry it took (None when not known), found
    in its bytecode (Python 3.10 to 3.13)."""
    from_shape: dict[str, tuple[int, int | None]] = {}
    other: set[str] = set()
    read, unpacked, total, const = None, 0, 0, None  # the shape read under way
    sizing = False  # x.size seen, its call still to come
    for ins in dis.get_instructions(code):
        name = ins.opname
        if name in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval in ("shape", "size"):
            read, unpacked, total, const = ins.offset, 0, 0, None
            sizing = ins.argval == "size"
        elif name == "LOAD_CONST" and read is not None:
            const = ins.argval if isinstance(ins.argval, int) else None
        elif name in _CALLS and read is not None:
            # x.size(...) reads the shape in its call; any other call makes something else
            read, sizing = (ins.offset if sizing else None), False
        elif name == "UNPACK_SEQUENCE" and read is not None:
            unpacked = total = int(ins.argval)
        elif name.startswith("STORE_FAST"):
            names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            names = names[:1] if name == "STORE_FAST_LOAD_FAST" else names
            for local in names:
                if read is None:
                    other.add(local)
                    continue
                entry = (read, total - unpacked if total else const)
                if from_shape.setdefault(local, entry) != entry:
                    other.add(local)  # read from two places: no single source
                unpacked = max(unpacked - 1, 0)
            if not unpacked:
                read = None
        elif name == "BINARY_OP" and ins.argrepr == "[]":
            continue  # Python 3.14's subscript
        elif name not in _PASS_THROUGH:
            read, unpacked, total = None, 0, 0
    return {local: at for local, at in from_shape.items() if local not in other}


def spelled_names(source: str) -> frozenset[str]:
    """The identifiers in ``source``."""
    return frozenset(re.findall(r"[A-Za-z_]\w*", source))


_SHAPE_CALLS = frozenset({"view", "reshape"})


def _shape_entries(source: str, ndim: int) -> list[ast.expr] | None:
    """The entries of the shape in ``source`` when it is a ``view``/``reshape`` call spelling
    all ``ndim`` of them: ``x.view(b, n, C)``, ``x.reshape((b, n, C))``,
    ``torch.reshape(x, (b, n, C))``; one entry for a shape held in a name (``view(shape)``)."""
    try:
        call = ast.parse("(" + source.strip() + ")", mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
        return None
    if call.func.attr not in _SHAPE_CALLS or call.keywords:
        return None
    entries = call.args
    owner = call.func.value
    if isinstance(owner, ast.Name) and owner.id == "torch" and entries:
        entries = entries[1:]  # torch.reshape(x, shape)
    if len(entries) == 1 and isinstance(entries[0], (ast.Tuple, ast.List)):
        entries = entries[0].elts
    if len(entries) == 1 and ndim > 1 and isinstance(entries[0], (ast.Name, ast.Attribute)):
        return entries  # the shape is one name: an attribute (``self.shape``) or a local
    if len(entries) != ndim or any(isinstance(e, ast.Starred) for e in entries):
        return None
    return entries


def names_at(source: str, axis: int, ndim: int) -> frozenset[str] | None:
    """The identifiers of the shape entry at ``axis`` of a ``view``/``reshape`` call in
    ``source`` (of the whole shape when a name holds it); None when the source does not say."""
    entries = _shape_entries(source, ndim)
    if entries is None:
        return None
    node = entries[axis] if len(entries) == ndim else entries[0]
    return frozenset(
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, (ast.Name, ast.Attribute))
    )


def shape_read_at(source: str, axis: int, ndim: int) -> bool:
    """Whether the shape entry at ``axis`` of a ``view``/``reshape`` call in ``source`` reads a
    tensor's size itself (``self.weights.shape[-1]``, ``x.size(-1)``, ``x.size()[2]``): such an
    entry follows the pruned width by itself."""
    entries = _shape_entries(source, ndim)
    if entries is None or len(entries) != ndim:
        return False
    node = entries[axis]
    if isinstance(node, ast.Subscript):  # x.shape[k], x.size()[k]
        node = node.value
        if isinstance(node, ast.Attribute) and node.attr == "shape":
            return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "size"
    )


def bare_name_at(source: str, axis: int, ndim: int) -> str | None:
    """The local spelled alone at ``axis`` of the shape in ``source`` (``C`` in
    ``reshape(B, N, C)``, not ``C // 2``), else None."""
    entries = _shape_entries(source, ndim)
    if entries is None or len(entries) != ndim:
        return None
    node = entries[axis]
    return node.id if isinstance(node, ast.Name) else None


def names_in_use(frames: list[Any]) -> frozenset[str]:
    """Every name the code now running on a module refers to: ``co_names`` of ``frames`` and
    of the functions defined in them, the frames of methods called on the module (its
    forward, helpers it called, and functions that take it first, such as HF's attention
    functions).
    An attribute holding a width can only have reached a reshape through one of these, so an
    attribute that merely holds the same value (GPT-2's unused ``embed_dim`` beside its
    ``split_size``) is left alone. Empty when no such frame is found."""
    names: set[str] = set()
    for frame in frames:
        names.update(_code_names(frame.f_code))
        names.update(_config_reads(frame.f_code))
    return frozenset(names)


@functools.lru_cache(maxsize=1024)
def defined_in(code: Any, outer: Any) -> bool:
    """Whether ``code`` is a function defined inside ``outer`` (at any depth)."""
    inner = [c for c in outer.co_consts if isinstance(c, types.CodeType)]
    return any(c is code or defined_in(code, c) for c in inner)


@functools.lru_cache(maxsize=1024)
def _code_names(code: Any) -> frozenset[str]:
    """``co_names`` of ``code`` and of the functions defined in it (LongT5's ``unshape``,
    nested in its forward, reshapes with ``self.inner_dim``)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
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
