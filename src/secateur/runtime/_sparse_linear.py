"""Linear and Conv2d layers whose weight is stored as a torch sparse CSR or BSR tensor.

Inference only: the sparse weight is a buffer, never a trainable parameter. Run these modules under
``torch.no_grad()`` or ``torch.inference_mode()``; gradients still reach the *input* (PyTorch's
sparse ``addmm`` supports that), but the weight can never be fine-tuned. To train again, call
``to_dense()`` (or ``runtime.densify_``).

On CPU, PyTorch's sparse kernels (MKL) take float32 and float64 only. The sparse weight is a
runtime form, not a file format: ``densify_`` before ``save_model`` (safetensors stores dense
tensors) and ``sparsify_`` again after loading.

Kernel choice, measured once (ad-hoc script, 300x784 and 1024x1024 weights at 90-98% sparsity,
batch 1 and 64, 2-core x86 VM, 1 thread, torch 2.14): for ``y = x W^T + b`` with a CSR ``W``,
``torch.addmm(b[:, None], W, x.T).T`` (sparse @ dense, the layout MKL's sparse mm wants) beat
``F.linear(x, W_csr, b)`` by 2.5-4.5x at batch 64, ``torch.sparse.mm(W, x.T).T + b`` by 10-70%,
and matched ``torch.sparse.addmm``. int32 indices were ~5-15% faster than int64. The same addmm
is the fastest BSR call tried. Crossover sparsities: ``benchmarks/sparse_crossover.py``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

LAYOUTS = ("csr", "bsr")
CPU_DTYPES = (torch.float32, torch.float64)

Blocksize = int | tuple[int, int]

PER_IMAGE_MIN = 65536
"""SparseConv2d multiplies image by image once an image's column matrix holds this many values:
that skips copying the whole batch's columns into one (channels*kh*kw, batch*pixels) matrix and
the output back. Measured once (2-core VM, 1 thread, batch 32, 3x3 convs): 64->64 on 16x16
(576x256 columns per image) 2.7x faster per image at 99% sparsity; 64->64 on 8x8 (576x64) 2x
slower per image; 128->128 on 8x8 (1152x64) about even."""


def _blocksize(blocksize: Blocksize) -> tuple[int, int]:
    size = (blocksize, blocksize) if isinstance(blocksize, int) else tuple(blocksize)
    if len(size) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in size):
        raise ConfigError(
            f"blocksize={blocksize!r} must be an int or a pair of ints, e.g. (16, 16)"
        )
    if min(size) < 1:
        raise ConfigError(f"blocksize={blocksize!r} must be positive, e.g. (16, 16)")
    return size  # type: ignore[return-value]


def compress(weight: torch.Tensor, layout: str = "csr", blocksize: Blocksize = 16) -> torch.Tensor:
    """A 2-D dense ``weight`` as a sparse ``layout`` tensor ("csr" or "bsr") with int32 indices.

    Exact zeros are dropped (CSR) or whole all-zero ``blocksize`` blocks are (BSR).

    Raises:
        ConfigError: unknown layout; a shape not divisible by the BSR blocksize; a CPU dtype that
            the sparse kernels lack (only float32/float64 run on CPU).
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not known: choose one of {', '.join(LAYOUTS)}")
    w = weight.detach()
    if w.dim() != 2:
        raise ConfigError(f"weight of shape {tuple(w.shape)} is not 2-D: pass a Linear's weight")
    if w.device.type == "cpu" and w.dtype not in CPU_DTYPES:
        raise ConfigError(
            f"CPU sparse kernels take float32/float64, not {w.dtype}: call .float() on the model first"
        )
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and nothing to fix
        warnings.simplefilter("ignore", UserWarning)
        if layout == "csr":
            s = w.contiguous().to_sparse_csr()
            make = torch.sparse_csr_tensor
        else:
            size = _blocksize(blocksize)
            if w.shape[0] % size[0] or w.shape[1] % size[1]:
                raise ConfigError(
                    f"weight {w.shape[0]}x{w.shape[1]} is not divisible into {size[0]}x{size[1]} "
                    f"blocks: pick a blocksize dividing both, or use layout='csr'"
                )
            s = w.contiguous().to_sparse_bsr(size)
            make = torch.sparse_bsr_tensor
        if s.values().numel() < 2**31:
            s = make(
                s.crow_indices().to(torch.int32),
                s.col_indices().to(torch.int32),
                s.values(),
                s.shape,
            )
    return s


def sparse_mm(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a sparse ``weight`` (out, in) and dense ``x`` (rows, in).

    Returns a contiguous (rows, out) tensor, like ``F.linear``.
    """
    xt = x.T
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
    return y.T.contiguous()


def _layout_name(weight: torch.Tensor) -> str:
    names = {torch.sparse_csr: "csr", torch.sparse_bsr: "bsr"}
    if weight.layout not in names or weight.dim() != 2:
        raise ConfigError(
            f"weight layout {weight.layout} ({weight.dim()}-D) is not a 2-D CSR/BSR tensor: "
            f"build the module with from_dense(...)"
        )
    return names[weight.layout]


def _nnz(weight: torch.Tensor) -> int:
    return int((weight.values() != 0).sum())


class _SparseBase(nn.Module):
    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layout = _layout_name(weight)
        self.register_buffer("weight", weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @property
    def blocksize(self) -> tuple[int, int] | None:
        """The BSR block shape, ``None`` for CSR."""
        return tuple(self.weight.values().shape[1:3]) if self.layout == "bsr" else None

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros in the weight (what a dense copy would hold)."""
        return 1.0 - _nnz(self.weight) / self.weight.shape[0] / self.weight.shape[1]

    def _dense_weight(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.weight.to_dense()


class SparseLinear(_SparseBase):
    """Drop-in ``nn.Linear`` whose weight is a sparse CSR or BSR tensor (inference only).

    ``forward(x)`` takes ``(..., in_features)`` and returns ``(..., out_features)``, equal to the
    dense Linear's output within float tolerance (the sum order differs). It is faster than the
    dense Linear only when the weight is sparse enough for the batch and shape at hand; use
    :func:`secateur.runtime.sparsify_` to decide by measurement. See the module docstring for
    the autograd and dtype limits.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> dense = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     _ = dense.weight.masked_fill_(torch.rand(32, 64) < 0.9, 0.0)
        >>> sparse = SparseLinear.from_dense(dense, layout="csr")
        >>> x = torch.randn(5, 7, 64)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-5)
        True
    """

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, layout: str = "csr", blocksize: Blocksize = 16
    ) -> SparseLinear:
        """Copy ``linear`` into a SparseLinear; ``blocksize`` only matters for ``"bsr"``."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{type(linear).__name__} is not an nn.Linear: pass a Linear layer")
        return cls(compress(linear.weight, layout, blocksize), linear.bias)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sparse_mm(self.weight, x.reshape(-1, self.in_features), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same device and dtype; trainable again)."""
        w = self._dense_weight()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}{block}, "
            f"sparsity={self.sparsity:.3f}"
        )


def conv_refusal(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot run as a sparse matrix product, or ``None`` if it can.

    Plain ``nn.Conv2d`` layers of any kernel size, stride, padding and dilation qualify, with
    ``groups=1`` (one weight matrix) and zero padding (``padding_mode='zeros'``, or no padding at
    all, where the mode does not matter).
    """
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1 is one matrix product)"
    if conv.padding_mode != "zeros" and any(_padding(conv)):
        return f"padding_mode={conv.padding_mode!r} (only zero padding is supported)"
    return None


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    return _pad4(conv.kernel_size, conv.padding, conv.dilation)


def _pad4(
    kernel_size: tuple[int, ...], padding: tuple[int, ...] | str, dilation: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """A conv's input padding as ``F.pad`` takes it: (left, right, top, bottom).

    ``padding='same'`` puts the odd pixel of an odd total on the right/bottom, as PyTorch does.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
        return (left, right, top, bottom)
    ph, pw = padding
    return (pw, pw, ph, ph)


class SparseConv2d(_SparseBase):
    """Drop-in ``nn.Conv2d`` (groups 1, zero padding) computed as a sparse matrix product.

    The weight is stored as a sparse ``(out_channels, in_channels * kh * kw)`` CSR or BSR matrix;
    ``forward`` unfolds the input into columns (im2col, ``F.unfold``; a 1x1 kernel needs no
    unfolding) and multiplies. Any kernel size, stride, padding (``'same'`` too) and dilation.
    ``forward(x)`` takes ``(N, C, H, W)`` or ``(C, H, W)`` and returns what the dense conv would,
    within float tolerance. Inference only, like :class:`SparseLinear`. The unfolded input is
    ``kh * kw`` times the input's size: only a very sparse weight repays building it, which is
    why :func:`secateur.runtime.sparsify_` decides by measurement.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> dense = nn.Conv2d(8, 16, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = dense.weight.masked_fill_(torch.rand_like(dense.weight) < 0.9, 0.0)
        >>> sparse = SparseConv2d.from_dense(dense, layout="csr")
        >>> x = torch.randn(2, 8, 10, 10)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        kernel_size: tuple[int, int] = (1, 1),
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(weight, bias)
        self.kernel_size = tuple(kernel_size)
        if weight.shape[1] % (self.kernel_size[0] * self.kernel_size[1]):
            raise ConfigError(
                f"weight of {weight.shape[1]} columns does not hold whole {self.kernel_size} "
                f"kernels: build the module with from_dense(conv)"
            )
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.padding_mode = padding_mode  # kept only to rebuild the same Conv2d in to_dense()
        if self.padding == "same" and self.stride != (1, 1):
            raise ConfigError(f"padding='same' needs stride 1, not {self.stride}: pad explicitly")
        pad = _pad4(self.kernel_size, self.padding, self.dilation)
        if any(pad) and padding_mode != "zeros":
            raise ConfigError(
                f"padding_mode={padding_mode!r} with padding {self.padding}: only zero padding "
                f"runs sparse; keep this conv dense"
            )
        symmetric = pad[0] == pad[1] and pad[2] == pad[3]
        if symmetric and self.kernel_size != (1, 1):  # F.unfold pads by itself
            self._pad, self._unfold_padding = None, (pad[2], pad[0])
        else:
            self._pad, self._unfold_padding = (pad if any(pad) else None), (0, 0)

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, layout: str = "csr", blocksize: Blocksize = 16
    ) -> SparseConv2d:
        """Copy ``conv`` (see :func:`conv_refusal`) into a SparseConv2d; ``blocksize`` only
        matters for ``"bsr"`` and must divide out_channels and in_channels * kh * kw."""
        reason = conv_refusal(conv)
        if reason is not None:
            raise ConfigError(f"cannot run this conv as a sparse matrix product: {reason}")
        weight = compress(conv.weight.flatten(1), layout, blocksize)
        return cls(
            weight,
            conv.bias,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
        )

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) // (self.kernel_size[0] * self.kernel_size[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._pad is not None:
            x = F.pad(x, self._pad)
        if self.kernel_size == (1, 1):
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            n, c, h, w = x.shape
            cols = x.reshape(n, c, h * w)  # a view when x is contiguous
        else:
            n, _, h, w = x.shape
            (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
            ph, pw = self._unfold_padding
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            cols = F.unfold(x, self.kernel_size, self.dilation, self._unfold_padding, self.stride)
        _, k, length = cols.shape
        if n > 1 and k * length >= PER_IMAGE_MIN:  # (k, length) views, no transposed copies
            y = torch.stack([self._mm(c) for c in cols]).reshape(n, self.out_channels, h, w)
        else:  # one product; a view when n == 1
            y = self._mm(cols.transpose(0, 1).reshape(k, n * length))
            y = y.reshape(self.out_channels, n, h, w).transpose(0, 1).contiguous()
        return y.squeeze(0) if unbatched else y

    def _mm(self, cols: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(self.weight, cols)
        return torch.addmm(self.bias.unsqueeze(1), self.weight, cols)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (same device and dtype; trainable again)."""
        w = self._dense_weight()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w.reshape(conv.weight.shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, layout={self.layout}{block}, "
            f"sparsity={self.sparsity:.3f}"
        )


SparseConv1x1 = SparseConv2d
"""Former name of :class:`SparseConv2d`, from when only 1x1 convs ran sparse; the same class."""
