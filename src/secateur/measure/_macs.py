"""Multiply-accumulate (MAC) counting by forward hooks.

Method (stated once, used everywhere): one forward pass on the example inputs with hooks on every
``nn.Linear``, ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``. Each layer contributes one MAC
per weight element per output position it is applied at:

* Linear (and HF ``Conv1D``, a Linear with its weight stored transposed): ``in * out`` per row
  of its input (all leading dimensions are rows);
* Conv: ``out_channels * (in_channels / groups) * prod(kernel)`` per output spatial position;
* ConvTranspose: ``in_channels * (out_channels / groups) * prod(kernel)`` per *input* position.

* ``nn.MultiheadAttention`` (which reads its projection weights directly, so its ``out_proj``
  module never runs): its q, k and v projections per row of query, key and value, and its
  output projection per row of query, each ``in * out`` as for a Linear.
* Weights applied outside such layers, as mixture-of-experts layers do with stacked expert
  tensors: each ``F.linear`` call, and each ``x @ W`` with ``W`` a parameter or a 2-D slice of
  one, as a Linear, and each ``grouped_mm(x, w, offs)`` call
  ``in * out`` per row of ``x`` (each row meets one expert's matrix; ``nonzero`` counts the
  non-zero weights of the expert that row meets), and each ``bmm`` on a gathered
  ``stack[expert_ids]`` (one matrix per row) one MAC per gathered weight.

Bias additions, normalisation, activations, pooling, element-wise ops and products between two
activations (attention scores) are not counted, the convention of ptflops/fvcore "MACs". Totals are divided by the batch size (first dimension of the
first example input), so figures are per sample. ``nonzero`` counts only MACs whose weight is
non-zero: the work left for a kernel that skips zeros.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._experts import GROUPED, op_name
from .._inputs import split_inputs

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class MacCount:
    dense: int
    nonzero: int


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


def _attention_macs(module: nn.MultiheadAttention, args: tuple) -> tuple[int, int]:
    """q/k/v projections per row of query/key/value, and the output projection per query row."""
    query = args[0]
    key = args[1] if len(args) > 1 else query
    value = args[2] if len(args) > 2 else key
    if module.in_proj_weight is not None:
        weights = module.in_proj_weight.detach().chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    pairs = [*zip((query, key, value), weights, strict=True)]
    pairs.append((query, module.out_proj.weight))
    dense = sum(_rows(x) * w.numel() for x, w in pairs)
    nonzero = sum(_rows(x) * int((w.detach() != 0).sum()) for x, w in pairs)
    return dense, nonzero


class _FunctionalMacs(TorchFunctionMode):
    """Counts ``F.linear`` and ``grouped_mm`` calls made outside the hooked layers (``inside``
    is raised while one of those runs, so no weight is counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.dense = 0
        self.nonzero = 0
        self.gathered: dict[int, weakref.ref] = {}  # copies of parameter[index_tensor]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside == 0 and args:
            name = op_name(func)
            if name == "__getitem__" and _gathers_matrices(args, out):
                self.gathered = {k: r for k, r in self.gathered.items() if r() is not None}
                self.gathered[id(out)] = weakref.ref(out)
            elif name == "bmm" and len(args) == 2:
                for operand in args:
                    ref = self.gathered.get(id(operand))
                    if ref is not None and ref() is operand:  # one matrix per row, applied once
                        self.dense += operand.numel()
                        self.nonzero += int((operand.detach() != 0).sum())
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if name == "linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                rows = _rows(args[0])
                self.dense += rows * weight.numel()
                self.nonzero += rows * int((weight.detach() != 0).sum())
            elif name in ("matmul", "__matmul__", "mm") and _parameter_matrix(weight):
                rows = _rows(args[0])  # x @ W with W a parameter's 2-D slice (eager experts)
                self.dense += rows * weight.numel()
                self.nonzero += rows * int((weight.detach() != 0).sum())
            elif name in GROUPED and isinstance(weight, torch.Tensor):
                self._grouped(
                    args[0], weight, kwargs.get("offs", args[2] if len(args) > 2 else None)
                )
        return out

    def _grouped(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor | None) -> None:
        if weight.dim() != 3 or x.dim() != 2 or offs is None:
            return
        per_expert = weight[0].numel()
        ends = offs.detach().long().tolist()
        rows = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        nonzero = (weight.detach() != 0).flatten(1).sum(1).tolist()
        self.dense += sum(rows) * per_expert
        self.nonzero += sum(r * int(n) for r, n in zip(rows, nonzero, strict=True))


def _parameter_matrix(weight: object) -> bool:
    """A 2-D parameter, or a 2-D view of one (one expert's matrix of a stack)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    return isinstance(weight, nn.Parameter) or isinstance(weight._base, nn.Parameter)


def _gathers_matrices(args: tuple, out: object) -> bool:
    """``stack[ids]``: a 3-D parameter gathered by a 1-D integer index (transformers'
    ``batched_mm`` experts pick one expert matrix per token row this way)."""
    if len(args) != 2 or not isinstance(out, torch.Tensor):
        return False
    source, index = args
    return (
        isinstance(source, nn.Parameter)
        and source.dim() == 3
        and isinstance(index, torch.Tensor)
        and index.dim() == 1
        and not index.is_floating_point()
        and index.dtype is not torch.bool
    )


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    weight = module.weight.detach()
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        rows = inp.numel() // inp.shape[-1]
        return rows * weight.numel(), rows * int((weight != 0).sum())
    if isinstance(module, _CONVS):
        # positions per output channel, over the whole batch
        positions = out.numel() // module.out_channels
        return positions * weight.numel(), positions * int((weight != 0).sum())
    # transposed conv: each input position scatters the full kernel of its group
    positions = inp.numel() // module.in_channels
    return positions * weight.numel(), positions * int((weight != 0).sum())


def count_macs(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | dict
) -> MacCount:
    """Count MACs per sample of ``model`` on ``example_inputs`` (see the module docstring).

    Example:
        >>> count_macs(nn.Linear(4, 3), torch.zeros(2, 4))
        MacCount(dense=12, nonzero=0)
    """
    inputs, kwargs = split_inputs(example_inputs)
    first = inputs[0] if inputs else next(iter(kwargs.values()), None)
    batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    totals = [0, 0]

    functional = _FunctionalMacs()

    def enter(module: nn.Module, args: tuple) -> None:
        functional.inside += 1

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        functional.inside -= 1
        if isinstance(module, nn.MultiheadAttention):
            dense, nonzero = _attention_macs(module, args)
        else:
            dense, nonzero = _layer_macs(module, args[0], out)
        totals[0] += dense
        totals[1] += nonzero

    layers = [
        m
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.MultiheadAttention, *_CONVS, *_TRANSPOSED)) or _is_conv1d(m)
    ]
    handles = [m.register_forward_pre_hook(enter) for m in layers]
    handles += [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad(), functional:
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    dense, nonzero = totals[0] + functional.dense, totals[1] + functional.nonzero
    return MacCount(dense=dense // batch, nonzero=nonzero // batch)
