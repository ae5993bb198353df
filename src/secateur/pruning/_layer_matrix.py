"""A layer seen as one matrix product: the weight as ``(rows, cols)`` with the columns being its
input features, and its input unfolded into rows of ``cols`` features each, so that the layer
computes ``rows @ weight_matrix.T`` (plus its bias). SparseGPT and structured reconstruction
both work on this view.

Layers handled (:func:`is_matrix_layer`): ``nn.Linear``; ``nn.Conv1d``/``Conv2d``/``Conv3d``
with ``groups == 1``, whose input is unfolded with the conv's own kernel, stride, padding,
padding mode and dilation, so that the columns are ``C_in·k₁·k₂…`` in the order of
``weight.reshape(out, -1)``; and Hugging Face ``Conv1D``, recognised by its class name, whose
weight is stored ``(in, out)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for a Hugging Face ``Conv1D`` (a Linear whose weight is stored transposed)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
    )


def is_matrix_layer(module: nn.Module) -> bool:
    """True when this module's view as a matrix product is defined here."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    return isinstance(module, CONVS) and module.groups == 1


def input_width(module: nn.Module) -> int:
    """Number of input columns of the layer's weight matrix."""
    if is_hf_conv1d(module):
        return module.weight.shape[0]
    return module.weight[0].numel()


def weight_matrix(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as a ``(rows, cols)`` copy in ``dtype``, columns = input features."""
    weight = module.weight.detach()
    if is_hf_conv1d(module):
        weight = weight.t()
    return weight.reshape(weight.shape[0], -1).to(dtype, copy=True)


def to_weight_shape(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: ``matrix`` laid out as ``module.weight``."""
    if is_hf_conv1d(module):
        return matrix.t()
    return matrix.reshape(module.weight.shape)


def column_index(module: nn.Module, channels: torch.Tensor) -> torch.Tensor:
    """The weight-matrix columns that read the given input channels (a conv channel spans one
    column per kernel tap)."""
    if isinstance(module, CONVS):
        taps = math.prod(module.kernel_size)
        return (channels[:, None] * taps + torch.arange(taps)[None, :]).flatten()
    return channels


def conv_padding(conv: nn.Module) -> list[tuple[int, int]]:
    """``(left, right)`` padding per spatial dim, as the conv itself applies it."""
    dims = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [(0, 0)] * dims
        if conv.padding == "same":
            pads = []
            for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        raise ConfigError(
            f"conv padding={conv.padding!r} is not understood: use 'same', 'valid' or integers, or exclude the layer"
        )
    return [(p, p) for p in conv.padding]


def _conv_rows(conv: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    dims = len(conv.kernel_size)
    if x.dim() == dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    x = x.to(dtype)
    pads = conv_padding(conv)
    if any(left or right for left, right in pads):
        flat = [p for left_right in reversed(pads) for p in left_right]
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, flat, mode=mode)
    for i in range(dims):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends the window as the last dim
        if d > 1:
            x = x[..., ::d]
    # (B, C, L₁…, k₁…) -> (B, L₁…, C, k₁…)
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    return x.permute(order).reshape(-1, input_width(conv))


def input_rows(
    module: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The layer's input ``x`` as ``(positions, cols)`` rows in ``dtype``: each row is what one
    output position multiplies the weight matrix by."""
    if isinstance(module, CONVS):
        return _conv_rows(module, x, dtype)
    return x.reshape(-1, x.shape[-1]).to(dtype)
