"""The decoder file of a transformers LM whose cache holds recurrent states: Mamba, Mamba2,
Gated DeltaNet, LFM2's convolutions and the hybrids of them with attention (Jamba, Bamba,
Granite 4.0-H, Falcon-H1, Zamba2, Nemotron-H, Qwen3.5, Qwen3-Next, OLMo hybrid, Kimi Linear).

Such a layer keeps, per sequence, a convolution state (the last few inputs of its causal
convolution) and a recurrent state (its scan's or delta rule's matrix), both of fixed size. The
file takes **one token per call**: the models' own single-token path, which has no loop over the
tokens and no chunk count a trace would freeze (their prompt path has both); where the model's
prompt path continues from given states, it also takes blocks of a fixed number of prompt
tokens (:mod:`._onnx_states_export`). :func:`prompt_spans` says which tokens go how; a token at
a time gives the prompt path's outputs to float error (the check compares them), and on the
tokens the mask pads every state is carried over unchanged, as if the padding were absent.

Inputs: ``input_ids`` (batch, 1, or the block's tokens), ``attention_mask`` (batch, past +
new), ``position_ids`` (batch, new) when the forward takes them; per layer ``i`` with
attention, ``past_key_values.{i}.key``/``.value`` (batch, kv heads, past, head dim); per
recurrent layer, ``past_key_values.{i}.conv.{s}`` and ``past_key_values.{i}.recurrent.{s}`` for
each state ``s`` it keeps, of fixed shapes after the batch (zeros before the first token).
Outputs: ``logits`` (batch, new, vocabulary) and the same tensors under ``present.`` after the
new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

# at most this many tokens past the example for the check's longer prompt
LONGER_BY_STEPS = 64


@dataclass(frozen=True)
class StateSlot:
    """One cache tensor of the file: layer ``layer``'s keys or values, or its state number
    ``index`` of kind ``conv`` or ``recurrent``; ``shape`` after the batch axis, with 0 for the
    past tokens of keys and values."""

    layer: int
    kind: str
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def suffix(self) -> str:
        if self.kind in ("key", "value"):
            return f"{self.layer}.{self.kind}"
        return f"{self.layer}.{self.kind}.{self.index}"

    def empty(self, batch: int) -> torch.Tensor:
        """The tensor before the first token: keys of length 0, states of zeros."""
        return torch.zeros((batch, *self.shape), dtype=self.dtype)


def _classes() -> dict[str, Any]:
    from transformers import cache_utils

    return {
        name: getattr(cache_utils, name, None)
        for name in (
            "DynamicLayer",
            "DynamicSlidingWindowLayer",
            "LinearAttentionCacheLayerMixin",
            "LinearAttentionLayer",
            "LinearAttentionAndFullAttentionLayer",
            "LinearAttentionAndSlidingWindowAttentionLayer",
            "DummyLayer",
        )
    }


def holds_states(cache: Any) -> bool:
    """Whether ``cache`` (a transformers cache after a prompt) has a recurrent layer."""
    mixin = _classes()["LinearAttentionCacheLayerMixin"]
    return mixin is not None and any(isinstance(ly, mixin) for ly in getattr(cache, "layers", ()))


def state_plan(cache: Any) -> tuple[list[tuple[type, int]], list[StateSlot]]:
    """From a cache after a prompt: the class of each layer in the file's cache (windowed
    attention kept whole, its mask hiding what lies outside the window, as in
    :func:`export_decoder_onnx`) with its number of states, and the file's cache tensors; a
    :class:`ConfigError` for a layer of another kind, or one that kept no keys (it reads
    another layer's)."""
    c = _classes()
    full = {
        c["DynamicSlidingWindowLayer"]: c["DynamicLayer"],
        c["LinearAttentionAndSlidingWindowAttentionLayer"]: c[
            "LinearAttentionAndFullAttentionLayer"
        ],
    }
    known = {c["DynamicLayer"], c["LinearAttentionLayer"], c["DummyLayer"], *full, *full.values()}
    classes, slots = [], []
    for i, layer in enumerate(cache.layers):
        kind = type(layer)
        if kind not in known:
            raise ConfigError(
                f"the model's cache holds a {kind.__name__} layer, which export_decoder_onnx "
                "does not write: use export_onnx (no cache) for this model"
            )
        classes.append((full.get(kind, kind), getattr(layer, "number_of_states", 0)))
        if isinstance(layer, c["LinearAttentionCacheLayerMixin"]):
            for s in range(layer.number_of_states):
                for name in ("conv", "recurrent"):
                    if getattr(layer, f"is_{name}_states_initialized")[s]:
                        t = getattr(layer, f"{name}_states")[s]
                        slots.append(StateSlot(i, name, s, tuple(t.shape[1:]), t.dtype))
        if isinstance(layer, c["DynamicLayer"]):
            if getattr(layer, "keys", None) is None:
                raise ConfigError(
                    f"layer {i} of the model's cache kept no keys (it shares another layer's), "
                    "which export_decoder_onnx does not write: use export_onnx (no cache)"
                )
            for name, t in (("key", layer.keys), ("value", layer.values)):
                shape = (int(t.shape[1]), 0, int(t.shape[3]))
                slots.append(StateSlot(i, name, 0, shape, t.dtype))
    return classes, slots


class StatefulStep(nn.Module):
    """Calls a decoder LM on new tokens (one, or a block none of which the mask pads) with the
    cache tensors of :class:`StateSlot` ``slots`` as inputs; returns the logits and the cache
    tensors after them, a row's states unchanged where the mask pads its last new token."""

    def __init__(
        self,
        model: nn.Module,
        classes: list[tuple[type, int]],
        slots: list[StateSlot],
        position_ids: bool,
        cache_keyword: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.classes = classes
        self.slots = slots
        self.position_ids = position_ids
        self.cache_keyword = cache_keyword

    def _cache(self, past: tuple[torch.Tensor, ...], mask: torch.Tensor, new: int) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import Cache

        c = _classes()
        layers = [
            cls(number_of_states=states)
            if issubclass(cls, c["LinearAttentionCacheLayerMixin"])
            else cls()
            for cls, states in self.classes
        ]
        for slot, tensor in zip(self.slots, past, strict=True):
            layer = layers[slot.layer]
            if slot.kind == "key":
                layer.lazy_initialization(tensor, tensor)
                layer.keys = tensor
            elif slot.kind == "value":
                layer.values = tensor
            else:
                state = tensor.clone()  # the model updates it in place
                if slot.kind == "conv":
                    layer.lazy_initialization(
                        conv_states=state, state_idx=slot.index, conv_kernel_size=state.shape[-1]
                    )
                else:
                    layer.lazy_initialization(recurrent_states=state, state_idx=slot.index)
                getattr(layer, f"{slot.kind}_states")[slot.index] = state
                layer.has_previous_state[slot.index] = True
                # the tokens before this call's, as a tensor the trace follows
                layer.cumulative_length_linear = (mask[0, new:] * 0 + 1).sum()
        cache = DynamicCache.__new__(DynamicCache)
        Cache.__init__(cache, layers=layers)
        return cache

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask = tensors[:2]
        head = 3 if self.position_ids else 2
        past = tensors[head:]
        kwargs: dict[str, Any] = {
            self.cache_keyword: self._cache(past, attention_mask, input_ids.shape[1])
        }
        if self.position_ids:
            kwargs["position_ids"] = tensors[2]
        # a model without attention takes no mask past the prompt (transformers' generate
        # drops it): Mamba's would broadcast the past's mask over the new token
        attends = any(s.kind == "key" for s in self.slots)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask if attends else None,
            use_cache=True,
            **kwargs,
        )
        cache = out.past_key_values
        present = [out.logits]
        # a padded token leaves every state as it was
        kept = attention_mask[:, -1].bool()
        for slot, before in zip(self.slots, past, strict=True):
            layer = cache.layers[slot.layer]
            if slot.kind in ("key", "value"):
                present.append(layer.keys if slot.kind == "key" else layer.values)
                continue
            after = getattr(layer, f"{slot.kind}_states")[slot.index]
            row = kept.view(-1, *([1] * (after.dim() - 1)))
            present.append(torch.where(row, after, before))
        return tuple(present)


def names(slots: list[StateSlot], position_ids: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The file's input and output names, in the wrapper's order."""
    head = ("input_ids", "attention_mask") + (("position_ids",) if position_ids else ())
    past = tuple(f"past_key_values.{s.suffix}" for s in slots)
    return head + past, ("logits",) + tuple(f"present.{s.suffix}" for s in slots)


def _axes(slots: list[StateSlot], position_ids: bool) -> dict[str, dict[int, str]]:
    """The dynamic axes: the batch everywhere, and the past of keys and values."""
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "logits": {0: "batch"},
    }
    if position_ids:
        axes["position_ids"] = {0: "batch"}
    for s in slots:
        grows = s.kind in ("key", "value")
        axes[f"past_key_values.{s.suffix}"] = (
            {0: "batch", 2: "past_sequence"} if grows else {0: "batch"}
        )
        axes[f"present.{s.suffix}"] = {0: "batch", 2: "total_sequence"} if grows else {0: "batch"}
    return axes


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """The last ``new`` tokens' positions as transformers' ``generate`` counts them (padding
    at 0)."""
    counted = mask.long().cumsum(-1) - 1
    return counted.masked_fill(mask == 0, 0)[:, -new:]


def prompt_spans(attended: Sequence[bool], block: int | None) -> list[tuple[int, int]]:
    """How a prompt goes through a file of recurrent states: ``(start, end)`` token ranges in
    order, covering every token. A call takes ``block`` tokens where every row attends all of
    them (a block carries no padding over) and one token elsewhere. ``attended[t]``: whether
    every row attends token ``t``; ``block`` ``None``: a token at a time."""
    spans, t = [], 0
    while t < len(attended):
        whole = block is not None and t + block <= len(attended) and all(attended[t : t + block])
        end = t + block if whole else t + 1
        spans.append((t, end))
        t = end
    return spans


def fed(
    step: StatefulStep,
    ids: torch.Tensor,
    mask: torch.Tensor,
    spans: list[tuple[int, int]] | None = None,
) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Each call's inputs and PyTorch outputs when the prompt ``ids`` is fed from an empty
    cache over ``spans`` (:func:`prompt_spans`; default a token at a time)."""
    past = tuple(s.empty(ids.shape[0]) for s in step.slots)
    calls = []
    for start, end in spans or [(t, t + 1) for t in range(ids.shape[1])]:
        head = (ids[:, start:end], mask[:, :end])
        where = (positions(mask[:, :end], end - start),) if step.position_ids else ()
        feed = head + where + past
        with torch.no_grad():
            out = step(*[x.clone() for x in feed])
        calls.append((feed, out))
        past = out[1:]
    return calls
