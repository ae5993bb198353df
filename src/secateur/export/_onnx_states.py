"""The decoder file of a transformers LM whose cache holds recurrent states: Mamba, Mamba2,
Gated DeltaNet, LFM2's convolutions and the hybrids of them with attention (Jamba, Bamba,
Granite 4.0-H, Falcon-H1, Zamba2, Nemotron-H, Qwen3.5, Qwen3-Next, OLMo hybrid, Kimi Linear).

Such a layer keeps, per sequence, a convolution state (the last few inputs of its causal
convolution) and a recurrent state (its scan's or delta rule's matrix), both of fixed size. The
file takes **one token per call**: the models' own single-token path, which has no loop over the
tokens and no chunk count a trace would freeze (their prompt path has both). A prompt is fed one
token at a time (:class:`secateur.measure.OnnxGenerator` does so), which gives the prompt
path's outputs to float error (the check compares them); on the tokens the mask pads, every
state is carried over unchanged, as if the padding were absent.

Inputs: ``input_ids`` (batch, 1), ``attention_mask`` (batch, past + 1), ``position_ids``
(batch, 1) when the forward takes them; per layer ``i`` with attention,
``past_key_values.{i}.key``/``.value`` (batch, kv heads, past, head dim); per recurrent layer,
``past_key_values.{i}.conv.{s}`` and ``past_key_values.{i}.recurrent.{s}`` for each state ``s``
it keeps, of fixed shapes after the batch (zeros before the first token). Outputs: ``logits``
(batch, 1, vocabulary) and the same tensors under ``present.`` after the token.

The check runs the example, twice its batch padded on the left, and a prompt up to
:data:`LONGER_BY_STEPS` tokens longer a token at a time in ONNX Runtime and in PyTorch, and
compares each row's last token with the model's own pass over the whole prompt: a model whose
single-token path is not its prompt path (or whose state before the first token is not zero)
is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, first_line
from ._onnx import _check_session, _to_onnx_bytes, _worst_difference, longer_by, longest_run

_FIX = "check the model for a size fixed at the example's"
# at most this many tokens past the example for the check's longer prompt: each is a call
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
    """Calls a decoder LM on one new token per row with the cache tensors of :class:`StateSlot`
    ``slots`` as inputs; returns the logits and the cache tensors after the token, a row's
    states unchanged where the mask pads its token."""

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

    def _cache(self, past: tuple[torch.Tensor, ...], mask: torch.Tensor) -> Any:
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
                # the tokens before this one, as a tensor the trace follows
                layer.cumulative_length_linear = (mask[0, 1:] * 0 + 1).sum()
        cache = DynamicCache.__new__(DynamicCache)
        Cache.__init__(cache, layers=layers)
        return cache

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask = tensors[:2]
        head = 3 if self.position_ids else 2
        past = tensors[head:]
        kwargs: dict[str, Any] = {self.cache_keyword: self._cache(past, attention_mask)}
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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """The last token's position as transformers' ``generate`` counts it (padding at 0)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)[:, -1:]


def token_by_token(
    step: StatefulStep, ids: torch.Tensor, mask: torch.Tensor
) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Each call's inputs and PyTorch outputs when the prompt ``ids`` is fed a token at a time
    from an empty cache."""
    past = tuple(s.empty(ids.shape[0]) for s in step.slots)
    calls = []
    for t in range(ids.shape[1]):
        head = (ids[:, t : t + 1], mask[:, : t + 1])
        feed = head + ((_positions(mask[:, : t + 1]),) if step.position_ids else ()) + past
        with torch.no_grad():
            out = step(*[x.clone() for x in feed])
        calls.append((feed, out))
        past = out[1:]
    return calls


def export_states(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prompt_cache: Any,
    position_ids: bool,
    cache_keyword: str,
    opset: int,
    tolerance: tuple[float, float] | None,
) -> tuple[bytes, tuple[str, ...], tuple[str, ...], float | None]:
    """The file's bytes, input and output names, and (with a ``tolerance``) the largest
    difference between ONNX Runtime and PyTorch; a :class:`ConfigError` for a cache of another
    kind, an :class:`ArtifactError` where the file or the single-token path disagrees."""
    attended = mask.cumsum(1) > 0  # from each row's first token on
    ended = mask.flip(1).cumsum(1).flip(1) > 0  # up to its last
    if bool(((mask == 0) & attended & ended).any()):
        raise ConfigError(
            "attention_mask pads between a row's tokens: pad on the left or the right only "
            "(a file of recurrent states skips padded tokens, the model's prompt pass does not)"
        )
    classes, slots = state_plan(prompt_cache)
    step = StatefulStep(model, classes, slots, position_ids, cache_keyword).eval()
    input_names, output_names = names(slots, position_ids)
    # traced at a batch and a past of 2 or more, which the tracer would otherwise fold
    batch_ids = torch.cat([ids, ids.flip(0)]) if ids.shape[0] < 2 else ids
    batch_mask = torch.cat([mask, mask.flip(0)]) if mask.shape[0] < 2 else mask
    trace_feed = _steps(step, batch_ids[:, :3], batch_mask[:, :3], "the example")[-1][0]
    data = _to_onnx_bytes(
        step, trace_feed, input_names, output_names, opset, _axes(slots, position_ids)
    )
    # the exporter drops an input the graph does not read (position_ids without rotary ones)
    import onnx

    kept = tuple(i.name for i in onnx.load_from_string(data).graph.input)
    if tolerance is None:
        return data, kept, output_names, None
    return data, kept, output_names, _check(data, step, ids, mask, input_names, kept, tolerance)


def _check(
    data: bytes,
    step: StatefulStep,
    ids: torch.Tensor,
    mask: torch.Tensor,
    input_names: tuple[str, ...],
    kept: tuple[str, ...],
    tolerance: tuple[float, float],
) -> float:
    """The largest difference between ONNX Runtime and PyTorch over every call that feeds the
    example token by token, again at twice the batch with rows padded on the left, and on a
    prompt up to :data:`LONGER_BY_STEPS` tokens longer (past a size the trace may have frozen
    in the attention layers); and each row's logits at its last token of the example and of
    the longer prompt against the model's own pass over the whole prompt."""
    session = _check_session(data)
    other_mask = mask.clone()
    other_mask[:, 0] = 0
    # (ids, mask, the model's own logits on the whole prompt where they are compared)
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {
        "the example": (ids, mask, _whole_logits(step.model, ids, mask)),
        # the padded rows follow the file's rule for pads, not the prompt pass's
        "twice the batch, padded": (
            torch.cat([ids, ids.roll(1, dims=1).flip(0)]),
            torch.cat([mask, other_mask]),
            None,
        ),
    }
    extra = min(longer_by(step.model, (ids,)), LONGER_BY_STEPS)
    if extra > 1:
        # every token attended: repeating the example's mask would put pads mid-prompt
        ones = torch.ones_like(mask)
        (long_ids, long_mask), whole = longest_run(_whole(step.model), (ids, ones), extra)
        if whole is not None:
            prompts[f"a prompt of {long_ids.shape[1]} tokens"] = (long_ids, long_mask, whole)
    worst = 0.0
    for what, (batch_ids, batch_mask, whole) in prompts.items():
        calls = _steps(step, batch_ids, batch_mask, what)
        for t, (feed, expected) in enumerate(calls):
            where = f"{what}'s token {t + 1} through the cache"
            try:
                named = dict(zip(input_names, feed, strict=True))
                got = session.run(None, {n: named[n].numpy() for n in kept})
            except Exception as exc:
                raise ArtifactError(
                    f"ONNX Runtime cannot run the export on {where}: {first_line(exc)}: {_FIX}"
                ) from None
            worst = max(
                worst,
                _worst_difference([e.numpy() for e in expected], got, tolerance, where, _FIX),
            )
        if whole is not None:
            _agrees_with_whole(step.model, whole, batch_mask, calls, tolerance)
    return worst


def _whole(model: nn.Module) -> Any:
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    return run


def _steps(step: StatefulStep, ids: torch.Tensor, mask: torch.Tensor, what: str) -> list:
    """:func:`token_by_token`, or a one-line :class:`ConfigError` where PyTorch fails."""
    try:
        return token_by_token(step, ids, mask)
    except Exception as exc:  # the model's single-token path does not take these inputs
        raise ConfigError(
            f"{type(step.model).__name__} does not run {what} a token at a time through its "
            f"states ({first_line(exc)}): use export_onnx (no cache) for this model"
        ) from None


def _whole_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's logits over the whole example, or a one-line :class:`ConfigError`."""
    try:
        with torch.no_grad():
            return _whole(model)(ids, mask)
    except Exception as exc:
        raise ConfigError(
            f"{type(model).__name__} does not run on the example ({first_line(exc)}): pass "
            "token ids of its vocabulary and a mask of their shape"
        ) from None


def _agrees_with_whole(
    model: nn.Module,
    whole: torch.Tensor,
    mask: torch.Tensor,
    calls: list,
    tolerance: tuple[float, float],
) -> None:
    """Raise :class:`ArtifactError` unless each row's logits at its last attended token, fed a
    token at a time, are ``whole``'s: the model's pass over the whole prompt."""
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = positions.masked_fill(mask == 0, -1).amax(1)  # right padding: an earlier token
    for row, t in enumerate(last.tolist()):
        if t < 0:
            continue  # a row of padding only
        fed, full = calls[t][1][0][row, -1], whole[row, t]
        if not torch.allclose(fed, full, rtol=tolerance[0], atol=tolerance[1]):
            raise ArtifactError(
                f"{type(model).__name__} gives other logits fed a token at a time than on the "
                f"whole prompt (max |difference| {float((fed - full).abs().max()):.3g} at "
                f"token {t + 1} of {mask.shape[1]}): the model's single-token path differs from "
                "its prompt path; use export_onnx (no cache) for this model"
            )
