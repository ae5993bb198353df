"""2:4 semi-structured sparse weights for ``nn.Linear`` on CUDA (sparse tensor cores).

PyTorch's ``torch.sparse.to_sparse_semi_structured`` compresses a 2-D weight with at most 2
non-zeros in every 4 consecutive entries of a row (for a Linear: along the input features) into
values + metadata that Ampere-and-newer tensor cores multiply at up to ~2x the dense speed.
Constraints (read from ``torch.sparse.semi_structured``, PyTorch docs "Accelerating BERT with
semi-structured sparsity" and the ``_DTYPE_SHAPE_CONSTRAINTS`` of each backend class):

- CUDA tensors only, compute capability >= 8.0 (A100, RTX 30xx/40xx, H100, ...);
- dtype float16 or bfloat16 (int8/float8 exist for quantized paths; float32 only on the CUTLASS
  backend, and not what a Linear wants);
- weight ``out x in`` with each dimension a positive multiple of the backend's minimum: cuSPARSELt
  (the default) 16 x 16 for fp16/bf16, CUTLASS 32 x 64. Inputs are padded by PyTorch itself.

On CPU no kernel uses the 2:4 pattern: a 2:4-masked Linear runs exactly as fast as the dense one,
and only a compressed file shrinks. Inference only: the converted weight is not trainable.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
NOT_2_4 = "weight is not 2:4 sparse: prune it with UnstructuredConfig(nm='2:4')"


def nm_pattern(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every run of ``m`` consecutive weights along each row has at most ``n``
    non-zeros; a row is an output unit's inputs (a conv's ``in x k...`` slice, flattened).

    A row length not a multiple of ``m`` is never N:M. A sparse ``weight`` is densified first.

    Raises:
        ConfigError: unless ``0 < n < m`` are ints.

    Example:
        >>> import torch
        >>> nm_pattern(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]), 2, 4)
        True
    """
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
        raise ConfigError(f"n={n!r}, m={m!r}: N:M needs ints with 0 < N < M, e.g. n=2, m=4")
    w = weight.detach()
    if w.layout != torch.strided or type(w) is not torch.Tensor:
        w = w.to_dense()
    rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    if rows.shape[1] == 0 or rows.shape[1] % m:
        return False
    counts = (rows.reshape(rows.shape[0], -1, m) != 0).sum(dim=-1)
    return bool((counts <= n).all())


def _backend() -> type:
    """The tensor subclass ``to_sparse_semi_structured`` builds: cuSPARSELt unless CUTLASS is
    forced or cuSPARSELt is missing from this PyTorch build."""
    from torch.sparse import SparseSemiStructuredTensor as Base
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    # private flag, read defensively: a PyTorch without it has no forced-CUTLASS mode
    if getattr(Base, "_FORCE_CUTLASS", False) or not torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


#: The documented minimum shapes per backend (PyTorch 2.4-2.14), used when a PyTorch build no
#: longer exposes its private ``_DTYPE_SHAPE_CONSTRAINTS`` table.
_FALLBACK_MIN_SHAPES = {
    "SparseSemiStructuredTensorCUSPARSELT": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "SparseSemiStructuredTensorCUTLASS": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}


def min_shape(dtype: torch.dtype) -> tuple[int, int] | None:
    """``(rows, cols)`` that a weight's shape must be a multiple of for ``dtype`` on the active
    backend, or ``None`` if the backend lacks the dtype."""
    backend = _backend()
    table = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if not isinstance(table, dict):
        return _FALLBACK_MIN_SHAPES.get(backend.__name__, {}).get(dtype)
    config = table.get(dtype)
    return None if config is None else (config.sparse_min_rows, config.sparse_min_cols)


def _is_semi_structured(weight: torch.Tensor) -> bool:
    from torch.sparse import SparseSemiStructuredTensor

    return isinstance(weight, SparseSemiStructuredTensor)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    }


def semi_structured_plan(model: nn.Module) -> dict[str, str]:
    """For every plain ``nn.Linear``: ``""`` if :func:`to_semi_structured_` would convert it,
    else the reason it stays dense (not 2:4, dtype, shape). Device-independent; changes nothing.
    """
    plan = {}
    for name, linear in _linears(model).items():
        w = linear.weight
        if _is_semi_structured(w):
            plan[name] = "already 2:4 semi-structured"
        elif not nm_pattern(w, 2, 4):
            plan[name] = NOT_2_4
        elif w.dtype not in HALF_DTYPES or min_shape(w.dtype) is None:
            plan[name] = f"dtype {w.dtype} is not float16/bfloat16: call model.half() first"
        else:
            rows, cols = min_shape(w.dtype)  # type: ignore[misc]
            out, inp = w.shape
            if out % rows or inp % cols:
                plan[name] = (
                    f"weight {out}x{inp} is not a multiple of {rows}x{cols}: the 2:4 kernel "
                    f"cannot run it, it stays dense"
                )
            else:
                plan[name] = ""
    return plan


def _check_devices(linears: dict[str, nn.Linear]) -> None:
    for name, linear in linears.items():
        device = linear.weight.device
        if device.type != "cuda":
            raise ConfigError(
                f"2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0, "
                f"but {name or 'the model'} is on {device}: move the model with .half().cuda() on "
                f"such a GPU; on CPU the 2:4 mask gives no speed-up, only the compressed file "
                f"shrinks"
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise ConfigError(
                f"2:4 semi-structured kernels need compute capability >= 8.0, {device} has "
                f"{capability[0]}.{capability[1]}: run on an Ampere or newer GPU (A100, RTX 30xx, "
                f"H100) or keep the model dense"
            )


def _convert(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, to_sparse_semi_structured

    w = weight.detach().contiguous()
    if _backend() is SparseSemiStructuredTensorCUSPARSELT:
        return to_sparse_semi_structured(w)
    return _backend().from_dense(w)  # cuSPARSELt missing: the CUTLASS kernels, as the docs advise


def _probe_ok(weight: torch.Tensor, sparse: torch.Tensor) -> bool:
    """The converted weight multiplies a random batch like the dense one (fp16 tolerance)."""
    x = torch.randn(32, weight.shape[1], device=weight.device, dtype=weight.dtype)
    want = F.linear(x, weight).float()
    got = F.linear(x, sparse).float()
    scale = want.abs().max().clamp_min(1e-3)
    return bool(((got - want).abs() <= 2e-2 * scale).all())


def to_semi_structured_(model: nn.Module) -> list[str]:
    """Convert, in place, every plain ``nn.Linear`` whose weight is 2:4 sparse (at most 2
    non-zeros in every 4 consecutive inputs) to a ``torch.sparse`` semi-structured weight.

    The model must be float16/bfloat16 on a CUDA GPU of compute capability >= 8.0 (see the module
    docstring for the shape rules). 2:4 layers that cannot run (dtype, shape, or a kernel that
    fails or disagrees with the dense product on a probe batch) stay dense and are named in one
    ``UserWarning``; :func:`semi_structured_plan` lists every layer's fate without converting.
    Non-2:4 layers are left alone silently. Inference only. Returns the converted names.

    Raises:
        ConfigError: a Linear's weight is not on CUDA, or its GPU is older than compute
            capability 8.0; nothing is converted then.

    Example (needs such a GPU):
        >>> from secateur import UnstructuredConfig, prune_
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64))  # doctest: +SKIP
        >>> _ = prune_(net, UnstructuredConfig(nm="2:4"))  # doctest: +SKIP
        >>> to_semi_structured_(net.half().cuda())  # doctest: +SKIP
        ['0']
    """
    linears = _linears(model)
    _check_devices(linears)
    plan = semi_structured_plan(model)
    converted, left = [], {}
    for name, reason in plan.items():
        if reason:
            if reason != NOT_2_4 and not reason.startswith("already"):
                left[name] = reason
            continue
        linear = linears[name]
        try:
            sparse = _convert(linear.weight)
            ok = _probe_ok(linear.weight.detach(), sparse)
        except RuntimeError as err:
            left[name] = f"kernel failed: {str(err).splitlines()[0]}"
            continue
        if not ok:
            left[name] = "kernel output differs from the dense product"
            continue
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    if left:
        listed = "; ".join(f"{name}: {why}" for name, why in left.items())
        warnings.warn(f"2:4 layers left dense: {listed}", UserWarning, stacklevel=2)
    return converted
