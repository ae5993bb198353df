"""Parameters read directly by a model's code (``self.weight`` in a hand-written norm, an MoE
expert's slice of a stacked weight, a bias viewed as heads): which of their dims each derived
tensor's axes still are, so that the tensor can join a channel space as a member."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._ops import ELEMENTWISE, POINTWISE, picks_rows
from ._shapes import follow_axis, index_axes, intact_axis, merge_run

PARAM_PASS = {"to", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach"}
PARAM_SHAPE = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "flatten"}


def gathers_rows(index: Any, src: torch.Tensor, out: torch.Tensor) -> bool:
    """``src[index]`` with a 1-D integer ``index`` keeps every axis but the first."""
    return (
        isinstance(index, torch.Tensor)
        and picks_rows(index)
        and out.dim() == src.dim()
        and out.shape[1:] == src.shape[1:]
    )


def single_number(index: Any) -> bool:
    """Whether ``index`` picks one entry of the first axis (an int or a 0-d integer tensor)."""
    if isinstance(index, torch.Tensor):
        return index.dim() == 0 and not index.is_floating_point() and index.dtype != torch.bool
    return isinstance(index, int) and not isinstance(index, bool)


def indexed_by_numbers(x: torch.Tensor, args: tuple, inputs: list[torch.Tensor]) -> bool:
    """``x[index]`` where the other tracked tensors are integer indices (token positions
    computed from a router's output): their values pick rows, their channels play no part."""
    return (
        bool(args)
        and args[0] is x
        and all(not t.is_floating_point() and t.dtype != torch.bool for t in inputs[1:])
    )


def param_gather(params: dict, args: tuple, inputs: list[torch.Tensor]) -> bool:
    """``stack[ids]``: a parameter indexed by tracked integer tensors (expert ids computed
    from a router's output) only picks whole matrices; the ids' channels play no part."""
    return (
        len(args) == 2
        and id(args[0]) in params
        and all(not t.is_floating_point() and t.dtype != torch.bool for t in inputs)
    )


def param_index_select(params: dict, name: str, args: tuple, inputs: list[torch.Tensor]) -> bool:
    """``table.index_select(0, ids)``: a parameter or buffer whose rows are picked by tracked
    integer tensors (M2M100's sinusoidal positions, by position ids computed from the tokens);
    the ids' channels play no part."""
    return (
        name == "index_select"
        and len(args) == 3
        and isinstance(args[0], torch.Tensor)
        and id(args[0]) in params
        and all(not t.is_floating_point() and t.dtype != torch.bool for t in inputs)
    )


def scalar_arithmetic(name: str, args: tuple, out: Any) -> bool:
    """Whether ``out`` is an elementwise function of ``args[0]`` alone (e.g. Gemma's
    ``1.0 + norm.weight``): other operands are plain numbers or 0-d tensors, and the shape
    stays, so each of its entries still belongs to the same channel as the parameter's."""
    if name not in POINTWISE and name not in ELEMENTWISE:
        return False
    others = args[1:3] if name in ELEMENTWISE else ()
    return (
        isinstance(out, torch.Tensor)
        and out.shape == args[0].shape
        and all(not isinstance(a, torch.Tensor) or a.dim() == 0 for a in others)
    )


def reshaped_dims(
    src: Sequence[int], dst: Sequence[int], dims: tuple, factors: tuple[int, ...]
) -> tuple[tuple, tuple[int, ...]]:
    """Parameter dims and per-axis factors of a view of a parameter: an axis that keeps its
    size keeps its dim; one split into ``(heads, head_dim)`` (DeBERTa's ``q_bias`` viewed as
    heads) maps its dim to the outer axis, each index covering ``head_dim`` entries."""
    out: list[int | None] = [None] * len(dst)
    out_factors = [1] * len(dst)
    run = merge_run(dst, src)
    for d, pd in enumerate(dims):
        mapped = follow_axis(src, dst, d)
        if mapped is not None:
            out[mapped], out_factors[mapped] = pd, factors[d]
        elif run is not None and d == run[0] and pd is not None:
            a, b = run
            out[a], out_factors[a] = pd, factors[d] * math.prod(dst[a + 1 : b])
        elif pd is not None and src[d] != 1 and (moved := intact_axis(src, dst, d)) is not None:
            # other axes split or merged around it (MaxViT's relative position bias table,
            # gathered to (P * P, heads) and viewed as (P, P, heads))
            out[moved], out_factors[moved] = pd, factors[d]
    return tuple(out), tuple(out_factors)


def indexed_dims(shape: Sequence[int], index: Any, dims: tuple, ndim: int) -> tuple:
    """The parameter dims of ``param[index]`` (DeBERTa's ``rel_embeddings[0 : 2 * span, :]``):
    an axis taken whole keeps its dim; a sliced or indexed one is no channel axis any more."""
    out: list[int | None] = [None] * ndim
    for d, (axis, sel) in enumerate(index_axes(shape, index) or []):
        whole = isinstance(sel, slice) and sel.indices(shape[d]) == (0, shape[d], 1)
        if axis >= 0 and whole:
            out[axis] = dims[d]
    return tuple(out)
