"""What a conv subclass adds to its filters: tensors of its own beside ``weight`` and ``bias``,
and weight standardisation.

timm's ``ScaledStdConv2d`` (NFNet) holds a ``gain`` of shape ``(out_channels, 1, 1, 1)``: one
value per filter, sliced with the filters. Its ``StdConv2d`` (BiT's ResNetV2) and
``ScaledStdConv2d`` standardise each filter over its inputs in their forward (a
``batch_norm`` on the weight): removing input channels changes those statistics, so the
channels it reads are of the ``pooled`` kind (removed, but not exactly), as under a LayerNorm.
Each filter of a depthwise or grouped conv reads only its own group, which goes whole: exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ._spaces import Layout, SpaceTable

# ops that, run inside a layer's forward on a tensor that is not an activation (its weight),
# pool statistics over the weight's entries
STANDARDISING = {
    *("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"),
    *("var_mean", "std_mean", "var", "std", "mean"),
    *("normalize", "norm", "vector_norm", "linalg_vector_norm", "_weight_norm"),
    "norm_except_dim",
}


def can_shrink_per_group(module: nn.Module) -> bool:
    """Whether structural pruning may shrink every group of this grouped conv alike (its
    ``groups`` stays; each group keeps as many inputs and outputs as the others) rather than
    remove whole groups: only when each group has at least two inputs and two outputs. With
    one (depthwise, or a channel multiplier) a unit across all groups would be the whole
    layer. Roles ``pergroup_in``/``pergroup_out`` tell the surgery which one the graph chose."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    return min(module.in_channels, module.out_channels) // module.groups >= 2


def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's parameters and buffers other than ``weight`` and ``bias``."""
    return [
        (name, t)
        for name, t in (
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        )
        if name not in ("weight", "bias") and t is not None
    ]


def add_filter_extras(
    table: SpaceTable,
    module: nn.Module,
    name: str,
    reads: Layout | None,
    writes: Layout,
    standardised: bool,
    per_group: bool = False,
) -> None:
    """Make ``module``'s per-filter tensors members of the space its filters write, and mark
    the channels it reads as pooled when it standardises its weight over them. A tensor is
    taken as per filter only when shaped as the weight with one value per filter (NFNet's
    gain, ``(out, 1, 1, 1)``); any other of more than one value (a ``(channels,)`` vector
    may scale the inputs as well as the filters) leaves both spaces whole: the surgery
    would not know how to cut it."""
    filters = module.out_channels
    per_filter = (filters,) + (1,) * (module.weight.dim() - 1)
    for tensor_name, t in own_tensors(module):
        if tuple(t.shape) == per_filter:
            table.add_member(writes, name, "param", tensor=tensor_name, dim=0)
        elif t.numel() > 1:
            reason = f"{name}.{tensor_name} of shape {tuple(t.shape)} is not one value per filter"
            table.block_layout(writes, reason)
            if reads is not None:
                table.block_layout(reads, reason)
    if standardised and reads is not None and (module.groups == 1 or per_group):
        for seg in reads:
            table.flag(seg.space, "pooled")
