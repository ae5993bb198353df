"""A forward for transformers' stacked experts that runs every expert in turn, each on the
tokens routed to it: traceable for ONNX export, and able to run each expert's matrices as
Linear modules of their own for PyTorch's int8 kernels.

transformers runs a mixture-of-experts layer (Mixtral, Qwen-MoE, OLMoE, GPT-OSS, ...) as
``eager`` (a Python loop over the experts the input happened to reach, which a trace freezes),
``grouped_mm`` (``histc``, which ONNX lacks) or ``batched_mm`` (one gathered weight matrix per
token and expert: a static graph, but it holds a copy of every routed token's matrices while it
runs, gigabytes for a long prompt through a large model). :func:`every_expert_forward` loops over
all experts, a number fixed by the model, and finds each one's tokens with ``nonzero``, which
ONNX computes at run time. The file then costs what eager PyTorch costs: each routed (token,
expert) pair is computed once, and no weights are copied. Each expert's slice of a stack is a
constant, so the exporter folds it into an initializer of its own; ONNX Runtime's int8 then
gives every expert its own scales. Switch Transformers keeps its experts as a dict of modules
with an eager loop of the same kind; :func:`every_listed_expert_forward` runs those in turn.

:func:`experts_as_linears_` goes further for PyTorch: it replaces each stack by one
``nn.Linear`` per expert (same values, the stack removed), which the loop then calls, so that
``torch.ao.quantization.quantize_dynamic`` reaches the experts like any other Linear.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual name

# the attributes transformers' experts decorator sets, which this forward reads
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


_LINEARS = "_linears"  # suffix of the ModuleList that replaces a stack


def _stacks(module: nn.Module) -> list[str]:
    """The names of an experts module's two weight stacks, the input one first."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def _project(module: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` through expert ``expert``'s matrix (and bias) of the stack ``name``, or through
    its Linear where :func:`experts_as_linears_` made one."""
    linears = getattr(module, name + _LINEARS, None)
    if linears is not None:
        return linears[expert](x)
    weight = getattr(module, name)[expert]
    out = x @ weight if module.is_transposed else F.linear(x, weight)
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[expert]
    return out


def every_expert_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' output for ``hidden_states`` (tokens, hidden) routed to ``top_k_index``
    (tokens, k) with ``top_k_weights`` (tokens, k): the contract of transformers' experts
    implementations, computed expert by expert. An index outside ``[0, num_experts)`` (an
    expert-parallel sentinel) reaches no expert and adds nothing, as in eager."""
    k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1)  # one entry per (token, slot) pair
    pairs = torch.zeros(
        experts.shape[0], hidden_states.shape[-1], dtype=hidden_states.dtype,
        device=hidden_states.device,
    )  # fmt: skip
    up = _stacks(self)[0]
    for expert in range(self.num_experts):
        chosen = (experts == expert).nonzero().squeeze(-1)
        x = hidden_states[torch.div(chosen, k, rounding_mode="floor")]
        h = _project(self, up, expert, x)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _project(self, "down_proj", expert, h)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        pairs = pairs.index_put((chosen,), h.to(pairs.dtype))
    # the routing weights keep their own dtype (float32 in most routers), so that a float16
    # or bfloat16 model weighs and sums its experts in float32, as batched_mm does
    weighted = pairs * top_k_weights.reshape(-1, 1)
    return weighted.view(-1, k, pairs.shape[-1]).sum(dim=1).to(hidden_states.dtype)


def loops_over_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module that :func:`every_expert_forward`
    runs: the decorator's flags, an expert count, the stacks it reads, not expert-parallel."""
    if not all(isinstance(getattr(module, flag, None), bool) for flag in _FLAGS):
        return False
    if getattr(module, "_is_expert_parallel", False) or not isinstance(
        getattr(module, "num_experts", None), int
    ):
        return False
    stacks = _stacks(module)
    stacks += [f"{name}_bias" for name in stacks] if module.has_bias else []
    tensors = [getattr(module, s, None) for s in stacks]
    if not all(isinstance(t, torch.Tensor) and t.shape[0] == module.num_experts for t in tensors):
        return False
    gate = callable(getattr(module, "_apply_gate", None))
    return gate if module.has_gate else callable(getattr(module, "act_fn", None))


_DICT_ARGS = ("hidden_states", "selected_experts", "routing_weights")


def _is_expert_dict(module: nn.Module) -> bool:
    """Whether ``module`` keeps its experts as modules ``expert_0`` ... ``expert_{n-1}`` of a
    ``ModuleDict`` and takes ``(hidden_states, selected_experts, routing_weights)``: Switch
    Transformers' layout, whose eager forward loops over the experts the input reached.
    (NLLB-MoE's dict of experts is not taken: transformers' eager forward for it indexes its
    experts by the values of a one-hot mask, which this loop would not reproduce.)"""
    experts = getattr(module, "num_experts", None)
    if not isinstance(module, nn.ModuleDict) or not isinstance(experts, int):
        return False
    if list(module.keys()) != [f"expert_{i}" for i in range(experts)]:
        return False
    try:
        params = tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params == _DICT_ARGS


def every_listed_expert_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """The output of a dict of experts for ``hidden_states`` (tokens, hidden), with
    ``selected_experts`` (tokens, k, experts) marking each token's experts and
    ``routing_weights`` (tokens, k) their weights: every expert in turn, on its tokens."""
    out = torch.zeros_like(hidden_states)
    marks = selected_experts.permute(2, 1, 0)  # (experts, k, tokens)
    for expert in range(self.num_experts):
        slot, token = torch.where(marks[expert])
        h = self[f"expert_{expert}"](hidden_states[token]) * routing_weights[token, slot, None]
        # each token meets an expert once, so its row is written once
        out = out + torch.zeros_like(out).index_put((token,), h.to(out.dtype))
    return out


def loop_over_experts_(model: nn.Module) -> int:
    """Give every experts module of ``model`` that :func:`loops_over_experts` accepts, and
    every dict of experts in Switch Transformers' layout, the expert-by-expert forward (on the
    instance; the class is untouched). Returns how many."""
    count = 0
    for module in model.modules():
        if loops_over_experts(module):
            module.forward = functools.partial(every_expert_forward, module)
            count += 1
        elif _is_expert_dict(module):
            module.forward = functools.partial(every_listed_expert_forward, module)
            count += 1
    return count


def experts_as_linears_(model: nn.Module) -> int:
    """Replace each stack of every experts module that :func:`loops_over_experts` accepts by
    a ``ModuleList`` of one ``nn.Linear`` per expert holding the same values (``<stack>_linears``;
    the stack and its bias are removed), and give the module the expert-by-expert forward,
    which calls them. Outputs are unchanged. Returns how many modules were rewritten."""
    count = 0
    for module in list(model.modules()):
        if not loops_over_experts(module):
            continue
        for name in _stacks(module):
            param = getattr(module, name)
            stack = param.detach()
            bias = getattr(module, f"{name}_bias").detach() if module.has_bias else None
            matrices = stack.transpose(1, 2) if module.is_transposed else stack  # (E, out, in)
            out, inp = matrices.shape[1:]
            grad = param.requires_grad
            linears = nn.ModuleList()
            for expert in range(module.num_experts):
                # built on meta (no random init to overwrite), then given the expert's values
                linear = nn.Linear(inp, out, bias=bias is not None, device="meta")
                linear.weight = nn.Parameter(matrices[expert].contiguous().clone(), grad)
                if bias is not None:
                    linear.bias = nn.Parameter(bias[expert].clone(), grad)
                linears.append(linear)
            delattr(module, name)
            if bias is not None:
                delattr(module, f"{name}_bias")
            module.add_module(name + _LINEARS, linears)
        module.forward = functools.partial(every_expert_forward, module)
        count += 1
    return count
