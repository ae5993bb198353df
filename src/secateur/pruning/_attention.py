"""``nn.MultiheadAttention`` whose inner width (``num_heads * head_dim``) may differ from
``embed_dim``, so whole heads can be pruned and the hidden size pruned on its own.

torch's module ties the q/k/v/out width to ``embed_dim`` (its functional forward asserts it), so
a pruned module switches to :class:`PrunedMultiheadAttention`, which computes the same attention
with plain functional ops from whatever widths its tensors have:

- ``in_proj_weight``: ``(3 * num_heads * head_dim, embed_dim)``, q, k and v rows stacked;
- ``out_proj.weight``: ``(out_features, num_heads * head_dim)``;
- ``bias_k`` / ``bias_v``: ``(1, 1, num_heads * head_dim)``.

The switch is ``module.__class__ = PrunedMultiheadAttention`` rather than building a new module:
the module keeps its identity, so its parameters (and an optimizer holding them), hooks, name and
every reference a parent or user code holds stay valid, and surgery's undo (which restores each
module's attributes) needs nothing extra: a restored module has its original widths again, with
which this forward computes exactly what torch's does. The switch also attaches a no-op hook
that keeps ``nn.TransformerEncoderLayer`` off its fused kernel, which assumes
``num_heads * head_dim == embed_dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

_SEPARATE = (
    "nn.MultiheadAttention with kdim/vdim different from embed_dim (separate q/k/v projection "
    "weights) is not supported by PrunedMultiheadAttention: leave the module unpruned"
)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Self- or same-width attention with the forward contract of ``nn.MultiheadAttention``
    (``(output, weights)``, ``batch_first``, unbatched inputs, masks, ``add_bias_kv``,
    ``add_zero_attn``, dropout in training mode) but ``num_heads * head_dim`` free of
    ``embed_dim``. ``embed_dim`` is the width it reads; it writes ``out_proj.out_features``.

    Supported: the packed projection (``kdim == vdim == embed_dim``), which is what the
    dependency graph prunes. A 3-D ``attn_mask`` must have ``batch * num_heads`` (the current
    head count) entries. Anything else raises a one-line ``ConfigError`` (a ``ValueError``).

    Example:
        >>> attn = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> _ = decouple_heads_(attn)
        >>> attn(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))[0].shape
        torch.Size([1, 3, 8])
    """

    _secateur_leaf = True  # the graph traces it whole, like torch's module

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not self._qkv_same_embed_dim:
            raise ConfigError(_SEPARATE)

    @property
    def inner_dim(self) -> int:
        """Width of q, k and v: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def forward(  # one pass over torch's options, in the order torch applies them
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over ``(N, L, E)`` (``batch_first``), ``(L, N, E)`` or unbatched ``(L, E)``
        inputs; returns the output and, with ``need_weights``, the attention weights averaged
        over heads ``(N, L, S)`` or per head ``(N, num_heads, L, S)`` (``N`` dropped when
        unbatched)."""
        if not self._qkv_same_embed_dim or self.in_proj_weight is None:
            raise ConfigError(_SEPARATE)
        if any(t.is_nested for t in (query, key, value)):
            raise ConfigError("PrunedMultiheadAttention does not take nested tensors: pad them")
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, head_dim, inner = self.num_heads, self.head_dim, self.inner_dim
        key_padding_mask = _additive("key_padding_mask", key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise ConfigError("is_causal=True needs attn_mask as well (the causal mask itself)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _additive("attn_mask", attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False

        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)

        if attn_mask is not None:
            attn_mask = self._shaped_mask(attn_mask, bsz, tgt_len, key.shape[0])
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        elif self.bias_k is not None or self.bias_v is not None:
            raise ConfigError("bias_k and bias_v must both be set or both be None")

        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros.to(v.dtype)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise ConfigError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                    f"{(bsz, src_len - self._extra_keys())} (batch, source length)"
                )
            padding = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, inner)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, inner)
            weights = None
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = out.view(tgt_len, bsz, out.shape[1])
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _extra_keys(self) -> int:
        return int(self.bias_k is not None) + int(self.add_zero_attn)

    def _check_shapes(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> bool:
        """Whether the inputs are batched; ``ConfigError`` when their shapes do not fit."""
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ConfigError(
                "query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        batched = query.dim() == 3
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ConfigError(
                f"key_padding_mask must be {query.dim() - 1}-D for {query.dim()}-D inputs, got "
                f"{key_padding_mask.dim()}-D"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ConfigError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        width = self.in_proj_weight.shape[1]
        if any(t.shape[-1] != width for t in (query, key, value)):
            raise ConfigError(
                f"query, key and value must have {width} features (embed_dim), got "
                f"{query.shape[-1]}, {key.shape[-1]} and {value.shape[-1]}"
            )
        if key.shape != value.shape:
            raise ConfigError(
                f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}"
            )
        return batched

    def _shaped_mask(self, mask: Tensor, bsz: int, tgt_len: int, src_len: int) -> Tensor:
        """A 2-D ``(L, S)`` mask as ``(1, L, S)``; a 3-D one must be ``(N * num_heads, L, S)``."""
        if mask.dim() == 2:
            if mask.shape != (tgt_len, src_len):
                raise ConfigError(
                    f"attn_mask has shape {tuple(mask.shape)}, expected {(tgt_len, src_len)}"
                )
            return mask.unsqueeze(0)
        expected = (bsz * self.num_heads, tgt_len, src_len)
        if mask.shape != expected:
            raise ConfigError(
                f"attn_mask has shape {tuple(mask.shape)}, expected {expected} (batch times "
                f"the {self.num_heads} heads left after pruning)"
            )
        return mask


def _additive(name: str, mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ConfigError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


def _no_fused_kernel(module: nn.Module, args: tuple) -> None:
    """A hook that does nothing, attached so that ``nn.TransformerEncoderLayer`` skips its fused
    kernel (it does whenever a submodule has hooks): the kernel reads ``embed_dim`` and
    ``num_heads`` and assumes ``num_heads * head_dim == embed_dim``, which no longer holds."""


def decouple_heads_(module: nn.MultiheadAttention) -> PrunedMultiheadAttention:
    """Switch ``module`` to :class:`PrunedMultiheadAttention` in place (it keeps every tensor,
    hook and reference) and return it; a module already switched is returned as it is.

    Raises:
        ConfigError: the module uses separate q/k/v weights (``kdim``/``vdim`` ≠ ``embed_dim``).
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise ConfigError(f"expected an nn.MultiheadAttention, got {type(module).__name__}")
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        raise ConfigError(_SEPARATE)
    if not isinstance(module, PrunedMultiheadAttention):
        module.__class__ = PrunedMultiheadAttention
        module.register_forward_pre_hook(_no_fused_kernel)
    return module  # type: ignore[return-value]


def set_num_heads_(module: nn.MultiheadAttention, num_heads: int) -> PrunedMultiheadAttention:
    """Give ``module`` ``num_heads`` heads of its ``head_dim`` (≤ the heads it has), as the
    subclass, with fresh uninitialised q/k/v/out tensors of those widths: the first step of
    reloading a head-pruned model, whose saved tensors are loaded into them next.

    Raises:
        ConfigError: ``num_heads`` is not an int in ``[1, module.num_heads]``, or the module is
            not supported (see :func:`decouple_heads_`).
    """
    attn = decouple_heads_(module)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise ConfigError(f"num_heads={num_heads!r} must be an integer")
    if not 1 <= num_heads <= attn.num_heads:
        raise ConfigError(f"num_heads={num_heads} must be between 1 and {attn.num_heads}")
    if num_heads == attn.num_heads:
        return attn
    inner = num_heads * attn.head_dim

    def fresh(owner: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        old = getattr(owner, name)
        if old is not None:
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))

    fresh(attn, "in_proj_weight", (3 * inner, attn.in_proj_weight.shape[1]))
    fresh(attn, "in_proj_bias", (3 * inner,))
    fresh(attn, "bias_k", (1, 1, inner))
    fresh(attn, "bias_v", (1, 1, inner))
    fresh(attn.out_proj, "weight", (attn.out_proj.weight.shape[0], inner))
    attn.out_proj.in_features = inner
    attn.num_heads = num_heads
    return attn
