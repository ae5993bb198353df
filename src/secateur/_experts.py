"""Stacked expert weights: the 3-D tensors in which mixture-of-experts layers keep one matrix
per expert (transformers 5's ``*Experts`` modules: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS
...), applied by ``F.linear`` on one expert's slice or by ``grouped_mm`` over all of them.

A parameter is an expert stack when it is a 3-D floating tensor held by a module that is not a
Linear/Conv layer, that module counts its experts (``num_experts``, ``num_local_experts``,
``total_experts`` or ``n_routed_experts``) equal to the tensor's first dimension, and it says
how each expert's matrix is laid out: ``is_transposed`` False for ``(out, in)``, the
``F.linear`` layout, True for ``(in, out)``, the ``grouped_mm`` layout. transformers' experts
decorator sets that flag on every experts module it wraps. Experts written otherwise (Llama 4's
run a plain ``bmm`` on ``(in, out)`` stacks and carry no flag) have no known input axis: weight
pruning leaves them dense, and only whole-expert removal, which needs no layout, reaches them.

:class:`ExpertInputs` watches a forward pass for those products and adds up, per expert, the
statistics of the input features each expert's matrix multiplied.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

EXPERT_COUNTS = ("num_experts", "num_local_experts", "total_experts", "n_routed_experts")
GROUPED = ("grouped_mm", "_grouped_mm", "grouped_mm_fallback")
_MATMUL = ("matmul", "__matmul__", "mm")


def op_name(func: object) -> str:
    """A torch function's name without an operator overload's suffix (``"x.default"``)."""
    return str(getattr(func, "__name__", "")).partition(".")[0]


def _counts_experts(module: nn.Module, experts: int) -> bool:
    return any(getattr(module, attr, None) == experts for attr in EXPERT_COUNTS)


def is_expert_stack(module: nn.Module, tensor: object, *, any_layout: bool = False) -> bool:
    """Whether ``tensor`` (a parameter of ``module``) stacks one weight matrix per expert in a
    known layout (``any_layout``: in any layout)."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dim() == 3
        and tensor.is_floating_point()
        and not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        and _counts_experts(module, tensor.shape[0])
        and (any_layout or isinstance(getattr(module, "is_transposed", None), bool))
    )


def transposed(module: nn.Module) -> bool:
    """True when ``module`` stores each expert's matrix ``(in, out)`` rather than ``(out, in)``."""
    return bool(getattr(module, "is_transposed", False))


def expert_stacks(
    model: nn.Module, *, any_layout: bool = False
) -> dict[str, tuple[str, nn.Module]]:
    """``{parameter name: (module name, module)}`` for every expert stack of ``model`` (in a
    known layout unless ``any_layout``)."""
    found = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if is_expert_stack(module, param, any_layout=any_layout):
                found[f"{module_name}.{attr}" if module_name else attr] = (module_name, module)
    return found


def as_rows(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """An expert stack as ``(experts·out, in)``: one row per output unit of each expert, columns
    along the input features (a copy when the stack is stored transposed)."""
    matrices = tensor.transpose(1, 2) if transposed(module) else tensor
    return matrices.reshape(-1, matrices.shape[-1])


def from_rows(module: nn.Module, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`as_rows` for a stack of ``shape``."""
    if transposed(module):
        return rows.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    return rows.reshape(shape)


def per_expert_input(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``(experts, in)`` values laid out to broadcast over the stack's ``(experts, ·, ·)``."""
    return values[:, :, None] if transposed(module) else values[:, None, :]


@dataclass
class ExpertFeatures:
    """Per-expert sums over the input rows each expert's matrix multiplied: ``sq_sum[e, j]``,
    ``abs_sum[e, j]`` and ``zeros[e, j]`` add up ``x²``, ``|x|`` and ``x == 0`` over the
    ``count[e]`` rows routed to expert ``e``."""

    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    zeros: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, experts: int, width: int, device: torch.device) -> ExpertFeatures:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=device)

        return cls(
            zeros(experts, width), zeros(experts, width), zeros(experts, width), zeros(experts)
        )

    @torch.no_grad()
    def add_rows(self, experts: torch.Tensor, x: torch.Tensor) -> None:
        """Add row ``r`` of ``x`` to expert ``experts[r]``."""
        rows = x.detach().float()
        ids = experts.to(rows.device)
        self.sq_sum.index_add_(0, ids, rows.pow(2))
        self.abs_sum.index_add_(0, ids, rows.abs())
        self.zeros.index_add_(0, ids, (rows == 0).float())
        self.count.index_add_(0, ids, torch.ones(ids.numel(), device=rows.device))

    def filled(self) -> ExpertFeatures:
        """An expert no calibration row reached takes the mean statistics of the experts that
        were reached (so it ranks like a typical expert, not as all-zero inputs)."""
        seen = self.count > 0
        if bool(seen.all()) or not bool(seen.any()):
            return self
        out = []
        for table in (self.sq_sum, self.abs_sum, self.zeros):
            table = table.clone()
            table[~seen] = table[seen].mean(0)
            out.append(table)
        count = self.count.clone()
        count[~seen] = count[seen].mean()
        return ExpertFeatures(*out, count)

    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ per expert and input feature, ``(experts, in)``."""
        return self.sq_sum.sqrt()

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count.clamp_min(1)[:, None]

    def apoz(self) -> torch.Tensor:
        return self.zeros / self.count.clamp_min(1)[:, None]


class ExpertInputs(TorchFunctionMode):
    """While active, records the input rows each expert matrix of ``stacks`` multiplies into
    ``self.features`` (parameter name → :class:`ExpertFeatures`).

    Seen, as transformers' experts run them: ``F.linear(x, stack[e])`` or ``x @ stack[e]``
    on one expert's whole matrix, a view of the stack (``eager``); ``grouped_mm(x, stack or
    stack.mT, offs=...)`` and transformers' fallback op, rows of ``x`` grouped by expert
    (``grouped_mm``); ``bmm`` on ``stack[expert_ids]``, one gathered matrix per row
    (``batched_mm``). Other kernels go unseen.
    """

    def __init__(self, model: nn.Module, names: list[str] | None = None) -> None:
        super().__init__()
        stacks = expert_stacks(model)
        wanted = stacks if names is None else {n: stacks[n] for n in names if n in stacks}
        self.params = {n: model.get_parameter(n) for n in wanted}
        self.features: dict[str, ExpertFeatures] = {}
        # id of a gathered ``stack[expert_ids]`` -> (a weak reference to it, stack name, ids)
        self.gathered: dict[int, tuple[weakref.ref, str, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if not self.params or not args:
            return out
        if name == "__getitem__" and len(args) == 2:
            self._remember_gather(args[0], args[1], out)
        elif name == "bmm" and len(args) == 2:
            self._batched(*args)
        elif name in ("linear", *_MATMUL, *GROUPED):
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("mat2"))
            x = args[0]
            if isinstance(weight, torch.Tensor) and isinstance(x, torch.Tensor):
                if name == "linear" and weight.dim() == 2:
                    self._one(x, weight, inputs_axis=1)
                elif name in _MATMUL and weight.dim() == 2:
                    self._one(x, weight, inputs_axis=0)  # x @ W: W's rows are the inputs
                elif name in GROUPED and weight.dim() == 3:
                    self._grouped(x, weight, kwargs.get("offs", args[2] if len(args) > 2 else None))
        return out

    def _remember_gather(self, source: object, index: object, out: object) -> None:
        if not (
            isinstance(index, torch.Tensor) and index.dim() == 1 and isinstance(out, torch.Tensor)
        ):
            return
        if index.dtype in (torch.bool, torch.uint8) or not isinstance(source, torch.Tensor):
            return
        for name, param in self.params.items():
            if source is param:
                self.gathered = {k: v for k, v in self.gathered.items() if v[0]() is not None}
                self.gathered[id(out)] = (weakref.ref(out), name, index.detach().long())
                return

    def _batched(self, a: object, b: object) -> None:
        """``bmm(W[ids], x[..., None])`` (``(out, in)`` experts) or ``bmm(x[:, None], W[ids])``
        (``(in, out)`` experts): row ``r`` of ``x`` met expert ``ids[r]``."""
        for weight, x in ((a, b), (b, a)):
            found = self.gathered.get(id(weight)) if isinstance(weight, torch.Tensor) else None
            if found is None or found[0]() is not weight or not isinstance(x, torch.Tensor):
                continue
            _, name, ids = found
            rows = x.squeeze(-1) if weight is a else x.squeeze(1)
            if rows.dim() == 2 and rows.shape[0] == ids.numel():
                self.take(name, ids, rows)
            return

    def _owner(self, weight: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """The stack ``weight`` is (or is a view of: a slice, a transpose)."""
        root = weight if weight._base is None else weight._base
        for name, param in self.params.items():
            if root is param:
                return name, param
        return None

    def _one(self, x: torch.Tensor, weight: torch.Tensor, inputs_axis: int) -> None:
        """``F.linear(x, W)`` (inputs along W's axis 1) or ``x @ W`` (axis 0) where ``W`` is
        one expert's matrix of a stack, or its transpose."""
        owner = self._owner(weight)
        if owner is None or x.shape[-1] != weight.shape[inputs_axis]:
            return
        name, param = owner
        matrix = tuple(param.shape[1:])
        if tuple(weight.shape) not in (matrix, matrix[::-1]) or param.stride(0) <= 0:
            return  # not one expert's whole matrix (a reshaped stack, a part of one)
        offset = weight.storage_offset() - param.storage_offset()
        expert, within = divmod(offset, param.stride(0))
        if within == 0 and 0 <= expert < param.shape[0]:
            rows = x.reshape(-1, x.shape[-1])
            self.take(name, torch.full((rows.shape[0],), expert, device=x.device), rows)

    def _grouped(self, x: torch.Tensor, weight: torch.Tensor, offs: object) -> None:
        owner = self._owner(weight)
        if owner is None or not isinstance(offs, torch.Tensor) or x.dim() != 2:
            return
        name, param = owner
        ends = offs.detach().long()[: param.shape[0]].to(x.device)
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))
        ids = torch.repeat_interleave(torch.arange(ends.numel(), device=x.device), sizes)
        self.take(name, ids, x[: ids.numel()])

    def take(self, name: str, experts: torch.Tensor, rows: torch.Tensor) -> None:
        """Row ``r`` of ``rows`` (``(n, in)``) was multiplied by expert ``experts[r]`` of the
        stack ``name``: add it to that expert's statistics. Subclasses gather other sums."""
        entry = self.features.get(name)
        if entry is None:
            param = self.params[name]
            entry = ExpertFeatures.empty(param.shape[0], rows.shape[-1], param.device)
            self.features[name] = entry
        entry.add_rows(experts, rows)


class ExpertGrams(ExpertInputs):
    """While active, adds up per expert of each stack of ``names``: ``sums[name][e]`` the
    ``Σ x xᵀ`` in ``dtype`` over the input rows expert ``e`` multiplied (a 1 appended to each
    row for the stacks in ``biased``), ``rows[name][e]`` how many rows that was. A stack no
    row reached has no entry."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        dtype: torch.dtype = torch.float32,
        biased: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        super().__init__(model, names)
        self.dtype = dtype
        self.biased = biased
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}

    def take(self, name: str, experts: torch.Tensor, rows: torch.Tensor) -> None:
        x = rows.detach().to(self.dtype)
        if name in self.biased:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        if name not in self.sums:
            count = self.params[name].shape[0]
            self.sums[name] = x.new_zeros(count, x.shape[1], x.shape[1])
            self.rows[name] = torch.zeros(count, dtype=torch.long)
        ids = experts.to(x.device)
        for expert in ids.unique().tolist():
            picked = x[ids == expert]
            self.sums[name][expert].addmm_(picked.t(), picked)
            self.rows[name][expert] += picked.shape[0]
