"""Operations PyTorch's TorchScript ONNX exporter cannot convert, or converts wrongly, traced
as equivalent ones for the export's duration only: :func:`exportable_ops` enters them all.

- ``expm1``: no conversion at any opset (Apertus's xIELU activation); traced as ``exp(x) - 1``.
- ``repeat_interleave`` by a whole number along a dimension: the exporter's conversion
  rewrites a ``-1`` used elsewhere in the graph (pytorch/pytorch#128505; Cohere, GLM and
  Helium interleave their rotary tables this way); traced as stacked copies.
- ``cumsum`` of booleans: ONNX Runtime's CumSum takes none, yet the exporter passes the bool
  input on (transformers' chunked attention mask, Llama 4, counts left padding so); traced
  on int64, the dtype PyTorch gives the sum anyway.
- ``permute`` with negative dimensions: the exporter writes them into ``Transpose``'s
  ``perm`` as they are, which ONNX Runtime rejects (Mamba2's chunked scan permutes by
  ``(0, -2, -1, 1)``); traced with each counted from the front.
- ``tensor_split`` at a list of indices read off a shape (transformers 5.25's Mamba2 splits
  its sequence so): the exporter converts it as a split into that many equal sections, with
  a ``Tile`` ONNX Runtime rejects; traced as the slices it is defined as.
- ``torch.linalg.solve_triangular``: no conversion (Gated DeltaNet's chunked delta rule in
  Qwen3.5, Qwen3-Next, OLMo-hybrid); traced as the triangle's inverse by halves, times the
  right-hand side, see :func:`_by_halves`.
- Complex numbers: ONNX has none. Rotary embeddings written as complex products (Llama 4,
  DeepSeek-V2: ``torch.polar``, ``view_as_complex``, a product, ``view_as_real``) are traced
  on (real, imaginary) pairs held in a last axis of 2; see :class:`ComplexAsPairs`.

The model's own PyTorch forward outside the export is untouched.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ArtifactError


@contextlib.contextmanager
def exportable_ops() -> Iterator[None]:
    """Every rewrite of this module, for the duration of a ``torch.onnx.export`` call."""
    with (
        _patched("repeat_interleave", _by_stacking),
        _patched("expm1", _as_exp_minus_one),
        _patched("cumsum", _on_integers),
        _patched("permute", _from_the_front),
        _patched("tensor_split", _as_slices),
        _patched("solve_triangular", _by_halves, owners=(torch.linalg,)),
        ComplexAsPairs(),
    ):
        yield


@contextlib.contextmanager
def _patched(
    name: str, rewrite: Callable[[Any], Any], owners: tuple[Any, ...] = (torch, torch.Tensor)
) -> Iterator[None]:
    """``torch.<name>`` and ``Tensor.<name>`` (or ``name`` on each of ``owners``) as
    ``rewrite`` makes them from the originals, until the block ends."""
    originals = [getattr(owner, name) for owner in owners]
    for owner, original in zip(owners, originals, strict=True):
        setattr(owner, name, rewrite(original))
    try:
        yield
    finally:
        for owner, original in zip(owners, originals, strict=True):
            setattr(owner, name, original)


def _as_exp_minus_one(original: Any) -> Any:
    def expm1(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not isinstance(x, torch.Tensor):
            return original(x, *args, **kwargs)
        return torch.exp(x) - 1

    return expm1


def _on_integers(original: Any) -> Any:
    def cumsum(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool and "dtype" not in kwargs:
            x = x.long()
        return original(x, *args, **kwargs)

    return cumsum


def _from_the_front(original: Any) -> Any:
    def permute(x: torch.Tensor, *dims: Any, **kwargs: Any) -> torch.Tensor:
        order = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if "dims" in kwargs:
            order = kwargs.pop("dims")
        if isinstance(x, torch.Tensor) and all(type(d) is int for d in order):
            order = tuple(d % x.dim() if x.dim() else d for d in order)
        return original(x, tuple(order), **kwargs)

    return permute


def _by_stacking(original: Any) -> Any:
    """Same values as ``repeat_interleave``; other uses (tensor repeats, no dimension) are
    untouched."""

    def repeat_interleave(
        self: torch.Tensor, repeats: Any, dim: Any = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        whole = _is_whole(repeats) and repeats > 0
        if not (whole and isinstance(dim, int) and self.dim() > 0) or args:
            return original(self, repeats, dim, *args, **kwargs)
        axis = dim % self.dim()
        return torch.stack([self] * repeats, dim=axis + 1).flatten(axis, axis + 1)

    return repeat_interleave


def _as_slices(original: Any) -> Any:
    """``x.tensor_split([i, j, ...], dim)`` as ``x[..., :i]``, ``x[..., i:j]``, ..., its
    documented meaning; sections counts and tensors of indices are untouched."""

    def tensor_split(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        at = args[0] if args else kwargs.get("indices")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        known = set(kwargs) <= {"indices", "dim"} and len(args) <= 2
        if not (
            known
            and isinstance(x, torch.Tensor)
            and x.dim() > 0
            and isinstance(at, (list, tuple))
            and isinstance(dim, int)
            and all(_is_whole(i) or _is_traced_count(i) for i in at)
        ):
            return original(x, *args, **kwargs)
        axis = dim % x.dim()
        bounds = [None, *at, None]
        lead = (slice(None),) * axis
        return tuple(x[(*lead, slice(a, b))] for a, b in itertools.pairwise(bounds))

    return tensor_split


def _by_halves(original: Any) -> Any:
    """``torch.linalg.solve_triangular`` (no ONNX conversion; Gated DeltaNet solves its
    chunks' UT systems with it) as matrix products: the triangle's inverse by halves
    (:func:`_lower_inverse`), times the right-hand side. Upper systems are solved reversed,
    ``left=False`` ones transposed. ``out=`` calls are untouched."""

    def solve_triangular(
        a: Any, b: Any, *args: Any, upper: Any = None, left: Any = True, **kwargs: Any
    ) -> Any:
        unit = kwargs.get("unitriangular", False)
        plain = (
            not args
            and set(kwargs) <= {"unitriangular"}
            and isinstance(upper, bool)
            and isinstance(left, bool)
            and isinstance(unit, bool)
            and all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (a, b))
            and not (a.is_complex() or b.is_complex())
        )
        if not plain:
            if upper is not None:
                kwargs["upper"] = upper
            return original(a, b, *args, left=left, **kwargs)
        if not left:  # X A = B: A^T X^T = B^T
            a, b, upper = a.transpose(-2, -1), b.transpose(-2, -1), not upper
        if upper:  # rows and columns in reverse order make it lower
            a, b = a.flip(-2, -1), b.flip(-2)
        x = _lower_solve(a, b, unit)
        x = x.flip(-2) if upper else x
        return x if left else x.transpose(-2, -1)

    return solve_triangular


def _lower_solve(a: torch.Tensor, b: torch.Tensor, unit: bool) -> torch.Tensor:
    """``X`` with ``a X = b`` for lower-triangular ``a``, through products only."""
    rows = int(a.shape[-1])
    eye = torch.eye(rows, dtype=a.dtype, device=a.device)
    a = a.tril(-1) + eye if unit else a.tril()
    return _lower_inverse(a) @ b


def _lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """The inverse of lower-triangular ``a`` by halves: ``[[A, 0], [C, D]]`` inverts to
    ``[[A^-1, 0], [-D^-1 C A^-1, D^-1]]``, ``log2(n)`` levels deep. As stable as solving row by
    row (a sum of the powers of the strict triangle is not: its terms grow and cancel)."""
    rows = int(a.shape[-1])
    if rows == 1:
        return 1 / a
    half = rows // 2
    top, lower = _lower_inverse(a[..., :half, :half]), _lower_inverse(a[..., half:, half:])
    left = -(lower @ a[..., half:, :half] @ top)
    zeros = torch.zeros_like(a[..., :half, half:])
    return torch.cat([torch.cat([top, zeros], -1), torch.cat([left, lower], -1)], -2)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_traced_count(value: Any) -> bool:
    """A 0-d integer tensor: how the exporter's trace hands over a count read off a shape."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.dtype.is_floating_point
        and value.dtype != torch.bool
        and not value.is_complex()
    )


_MUL = {"mul", "__mul__", "__rmul__"}
# ops that act alike on a complex tensor and on its pairs, the pair axis kept last
_ALIKE = {"to", "contiguous", "clone", "detach"}
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_REAL = {v: k for k, v in _COMPLEX.items()}


def _as_real_dtype(value: Any) -> Any:
    return _REAL.get(value, value) if isinstance(value, torch.dtype) else value


def _name(func: Any) -> str:
    return getattr(func, "__name__", "")


class ComplexAsPairs(TorchFunctionMode):
    """Complex tensors traced as real tensors with a last axis of (real, imaginary).

    ``torch.polar`` and ``view_as_complex`` make such pairs, remembered by identity;
    products, basic indexing, ``unsqueeze``, casts and devices act on them as on the complex
    values; ``view_as_real`` hands the pairs back as the real tensor they are. Any other
    operation on a complex value raises :class:`ArtifactError` naming it, rather than trace
    something with other values (the export's check compares outputs anyway).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pairs: dict[int, torch.Tensor] = {}  # id -> the pairs, kept alive with the id

    def _mark(self, pairs: torch.Tensor) -> torch.Tensor:
        self._pairs[id(pairs)] = pairs
        return pairs

    def _is_pairs(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and self._pairs.get(id(value)) is value

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = _name(func)
        if name == "polar":
            magnitude = args[0] if args else kwargs["abs"]
            angle = args[1] if len(args) > 1 else kwargs["angle"]
            pairs = torch.stack((magnitude * torch.cos(angle), magnitude * torch.sin(angle)), -1)
            return self._mark(pairs)
        if name == "view_as_complex" and not self._is_pairs(args[0]):
            return self._mark(args[0].view(args[0].shape))
        marked = [v for v in tree_flatten([args, kwargs])[0] if self._is_pairs(v)]
        if not marked:
            return func(*args, **kwargs)
        if name == "view_as_real":
            return args[0].view(args[0].shape)  # the pairs, now an ordinary real tensor
        if name in _MUL and not kwargs:
            return self._mark(self._product(*args))
        if name == "__getitem__" and args[0] is marked[0]:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return self._mark(args[0][(*index, slice(None))])  # the pair axis stays whole
        if name == "unsqueeze" and args[0] is marked[0]:
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            return self._mark(args[0].unsqueeze(dim - 1 if dim < 0 else dim))
        if name in _ALIKE and args[0] is marked[0] and len(marked) == 1:
            dtypes = [v for v in (*args[1:], *kwargs.values()) if isinstance(v, torch.dtype)]
            if any(not d.is_complex for d in dtypes):  # PyTorch would drop the imaginary part
                raise ArtifactError(
                    "cannot export a cast of complex numbers to a real dtype to ONNX: take "
                    "view_as_real of them instead"
                )
            args, kwargs = tree_map(_as_real_dtype, (args, kwargs))  # pairs' dtype
            return self._mark(func(*args, **kwargs))
        if name == "__get__" and args[0] is marked[0]:
            return self._attribute(func, args[0])
        if name in ("size", "dim") and args[0] is marked[0]:
            shape = args[0].shape[:-1]
            if name == "dim":
                return len(shape)
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return shape if dim is None else shape[dim]
        raise ArtifactError(
            f"cannot export '{name}' on complex numbers to ONNX: only products, indexing and "
            "view_as_real of complex values (complex rotary embeddings) are rewritten; "
            "write this step with real tensors"
        )

    def _attribute(self, getter: Any, pairs: torch.Tensor) -> Any:
        """An attribute of a complex value, read off its pairs."""
        attribute = getattr(getattr(getter, "__self__", None), "__name__", "")
        if attribute in ("device", "requires_grad", "is_cuda", "is_meta"):
            return getattr(pairs, attribute)
        if attribute == "dtype":
            return _COMPLEX.get(pairs.dtype, pairs.dtype)
        if attribute == "shape":
            return pairs.shape[:-1]
        if attribute in ("real", "imag"):
            return pairs[..., 0 if attribute == "real" else 1]
        raise ArtifactError(
            f"cannot export the attribute '{attribute}' of complex numbers to ONNX: write this "
            "step with real tensors"
        )

    def _product(self, a: Any, b: Any) -> torch.Tensor:
        if not self._is_pairs(a):
            a, b = b, a
        if isinstance(b, complex):
            ar, ai = a.unbind(-1)
            return torch.stack((ar * b.real - ai * b.imag, ar * b.imag + ai * b.real), -1)
        if isinstance(b, torch.Tensor) and b.is_complex():
            raise ArtifactError(
                "cannot export a product with a complex tensor made outside the forward (a "
                "complex buffer) to ONNX: keep it as real pairs and multiply them"
            )
        if not self._is_pairs(b):  # complex times real: each part scaled
            scale = b.unsqueeze(-1) if isinstance(b, torch.Tensor) and b.dim() else b
            return a * scale
        ar, ai = a.unbind(-1)
        br, bi = b.unbind(-1)
        return torch.stack((ar * br - ai * bi, ar * bi + ai * br), -1)
