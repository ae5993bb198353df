"""The matrix view of a layer that SparseGPT and structured reconstruction share."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from secateur.pruning._layer_matrix import (
    column_index,
    input_rows,
    input_width,
    is_matrix_layer,
    to_weight_shape,
    weight_matrix,
)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(3, 5, 4, padding="same", dilation=2), (2, 3, 11)),
        (nn.Conv1d(3, 5, 3, stride=2, padding="valid"), (2, 3, 11)),
        (nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 3, 9, 8)),
        (nn.Conv2d(3, 5, 4, padding="same", padding_mode="reflect"), (2, 3, 9, 8)),
        (nn.Conv2d(3, 5, 3, padding=1, padding_mode="replicate"), (3, 9, 8)),
        (nn.Conv3d(2, 4, 3, stride=2, padding=1, padding_mode="circular"), (2, 2, 6, 7, 5)),
    ],
)
def test_conv_rows_reproduce_the_conv(conv: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    dims = len(conv.kernel_size)
    with torch.no_grad():
        y = conv(x) - conv.bias.view(-1, *([1] * dims))
        if x.dim() == dims + 1:
            y = y.unsqueeze(0)
        expected = y.movedim(1, -1).reshape(-1, conv.out_channels)
        got = input_rows(conv, x) @ weight_matrix(conv).t()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layer", [nn.Linear(6, 4), Conv1D(4, 6), nn.Conv2d(6, 4, 3, padding=1)], ids=str
)
def test_matrix_view_round_trips_and_reproduces_the_layer(layer: nn.Module) -> None:
    assert is_matrix_layer(layer)
    x = torch.randn(2, 6, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 7, 6)
    matrix = weight_matrix(layer, torch.float64)
    assert matrix.dtype == torch.float64
    assert matrix.shape == (4, input_width(layer))
    assert torch.equal(to_weight_shape(layer, matrix.float()), layer.weight.detach())
    with torch.no_grad():
        y = layer(x)
        y = y.movedim(1, -1) if isinstance(layer, nn.Conv2d) else y
        got = input_rows(layer, x) @ weight_matrix(layer).t() + layer.bias
    torch.testing.assert_close(got, y.reshape(-1, 4), rtol=1e-4, atol=1e-5)


def test_column_index_spans_every_tap_of_a_conv_channel() -> None:
    conv = nn.Conv2d(4, 2, (2, 3))
    columns = column_index(conv, torch.tensor([1, 3])).tolist()
    assert columns == [*range(6, 12), *range(18, 24)]
    weight = conv.weight.detach()
    picked = weight.reshape(2, -1)[:, columns].reshape(2, 2, 2, 3)
    assert torch.equal(picked, weight[:, [1, 3]])
    assert column_index(nn.Linear(5, 2), torch.tensor([0, 4])).tolist() == [0, 4]


def test_grouped_convs_and_other_modules_are_not_matrix_layers() -> None:
    assert not is_matrix_layer(nn.Conv2d(4, 4, 3, groups=2))
    assert not is_matrix_layer(nn.ConvTranspose2d(4, 4, 3))
    assert not is_matrix_layer(nn.LayerNorm(4))
