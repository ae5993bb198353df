"""Export a transformers decoder LM to ONNX with its key/value cache as inputs and outputs.

:func:`export_onnx` writes a file that runs the whole sequence on every call; generating ``n``
tokens with it costs ``n`` full passes. :func:`export_decoder_onnx` writes the file that
generation needs: each call takes the new tokens and the keys and values of the tokens before
them, and returns the logits and the keys and values extended by the new tokens. The names follow
the convention ONNX Runtime users of such files expect:

- inputs ``input_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence),
  ``position_ids`` (batch, sequence) when the model's forward takes them, and
  ``past_key_values.{i}.key`` / ``past_key_values.{i}.value`` (batch, kv heads, past, head dim)
  for every layer ``i``;
- outputs ``logits`` (batch, sequence, vocabulary; sequence is 1 with ``last_token_logits``)
  and ``present.{i}.key`` / ``present.{i}.value`` (batch, kv heads, past + sequence, head dim).

The first call (the prompt) passes keys and values of length 0. A structurally pruned model keeps
its own widths per layer: each layer's kv-head count and head dimension are fixed in the file.
:class:`secateur.measure.OnnxGenerator` runs such a file greedily.

Caches of keys and values are handled: full attention (Llama, Qwen, GPT-2, ...) and sliding-window
or chunked attention (Mistral, Gemma 2 and 3, Qwen 2 with ``use_sliding_window``). A windowed
layer's cache in the file keeps every past token, not the last window's: the model's attention
mask already hides the tokens outside the window by position, so the outputs are those of
transformers' windowed cache (the check compares both), while the cache grows with the sequence
as a full-attention layer's does. A model whose cache holds recurrent states (Mamba, Mamba2,
Gated DeltaNet, LFM2's convolutions, and their hybrids with attention) gets the file
:mod:`._onnx_states` describes: one token per call, its states in and out. A cache of another
kind, or with layers that share another's keys, is refused with a one-line error naming
:func:`export_onnx` as the way out.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write_bytes, ensure_writable_dir
from ..errors import ArtifactError, ConfigError, first_line
from ._onnx import (
    DEFAULT_OPSET,
    OnnxExport,
    _check_args,
    _check_session,
    _import_onnxruntime,
    _to_onnx_bytes,
    _traceable_experts_,
    _worst_difference,
    longer_by,
    longest_run,
)
from ._onnx_states import holds_states
from ._onnx_states_export import PREFILL_BLOCK, export_states


def _cache_keyword(model: nn.Module) -> str:
    """The forward keyword that takes a cache object (transformers 5 renamed it ``cache``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _WithCache(nn.Module):
    """Calls a decoder LM on new tokens and per-layer key/value tensors; returns the logits and
    the extended keys and values as a flat tuple."""

    def __init__(
        self, model: nn.Module, layers: int, position_ids: bool, last_token_logits: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.position_ids = position_ids
        self.last_token_logits = last_token_logits
        self.cache_keyword = _cache_keyword(model)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        input_ids, attention_mask = tensors[:2]
        extra = 3 if self.position_ids else 2
        past = tensors[extra:]
        # no config: every layer is a plain DynamicLayer that keeps all its keys, windowed or not
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        )
        kwargs: dict[str, Any] = {self.cache_keyword: cache}
        if self.position_ids:
            kwargs["position_ids"] = tensors[2]
        if self.last_token_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs
        )
        flat = [out.logits]
        for layer in _cache_layers(getattr(out, "past_key_values", None)):
            flat += [layer.keys, layer.values]
        return tuple(flat)


def _cache_layers(cache: Any, windowed: bool = False) -> list[Any]:
    """The layers of a transformers ``DynamicCache`` of plain key/value layers (and, with
    ``windowed``, of sliding-window ones), else a :class:`ConfigError` that says which cache the
    model keeps."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:
        raise ConfigError(
            "export_decoder_onnx needs a transformers release whose caches hold layers "
            "(DynamicLayer, 4.56 or later): pip install -U transformers"
        ) from None
    if not isinstance(cache, DynamicCache):
        raise ConfigError(
            f"the model keeps its cache as {type(cache).__name__}, not a transformers "
            "DynamicCache of keys and values: use export_onnx (no cache) for this model"
        )
    allowed = (DynamicLayer, DynamicSlidingWindowLayer) if windowed else (DynamicLayer,)
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) not in allowed}
    if kinds:
        raise ConfigError(
            f"the model's cache holds {', '.join(sorted(kinds))} layers (recurrent states or "
            "keys shared between layers), which export_decoder_onnx does not write: use "
            "export_onnx (no cache) for this model"
        )
    return list(cache.layers)


def _full_cache(model: nn.Module) -> dict[str, Any]:
    """The forward keyword argument that makes ``model`` keep every past key and value in plain
    DynamicLayers, windowed layers included (their mask hides what lies outside the window)."""
    from transformers import DynamicCache

    return {_cache_keyword(model): DynamicCache()}


def _windowed_agrees(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, tolerance: tuple[float, float]
) -> None:
    """Raise :class:`ArtifactError` unless the last token's logits through the model's own
    windowed cache equal those through a full cache: the file keeps a full one."""
    with torch.no_grad():
        logits = []
        for empty in ({}, _full_cache(model)):
            head = model(
                input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **empty
            )
            past = {_cache_keyword(model): head.past_key_values}
            out = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **past)
            logits.append(out.logits)
    if not torch.allclose(logits[0], logits[1], rtol=tolerance[0], atol=tolerance[1]):
        worst = float((logits[0] - logits[1]).abs().max())
        raise ArtifactError(
            f"{type(model).__name__} gives other logits through a full cache than through its "
            f"sliding-window cache (max |difference| {worst:.3g}): its mask does not apply the "
            "window by position; use export_onnx (no cache) for this model"
        )


def _position_ids(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Positions of the last ``new`` tokens as transformers' ``generate`` computes them: the
    count of attended tokens before each, padding at position 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, -new:]


def _split(example_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or "input_ids" not in example_inputs:
        raise ConfigError(
            "export_decoder_onnx takes example_inputs={'input_ids': ids, 'attention_mask': mask}"
        )
    unknown = sorted(set(example_inputs) - {"input_ids", "attention_mask"})
    if unknown:
        raise ConfigError(
            f"export_decoder_onnx takes input_ids and attention_mask only, not {unknown[0]!r}: "
            "drop it from example_inputs"
        )
    ids = example_inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 4:
        raise ConfigError(
            "input_ids must be a (batch, sequence) tensor of at least 4 tokens: the export "
            "traces half of them through the cache of the other half"
        )
    mask = example_inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ConfigError("attention_mask must be a tensor of input_ids' shape")
    return ids.detach().cpu().long(), mask.detach().cpu().long()


def _feed(
    ids: torch.Tensor,
    mask: torch.Tensor,
    past: list[torch.Tensor],
    position_ids: bool,
) -> tuple[torch.Tensor, ...]:
    """The wrapper's positional inputs: ``mask`` covers past and new tokens."""
    head = (ids, mask) + ((_position_ids(mask, ids.shape[1]),) if position_ids else ())
    return head + tuple(past)


def _empty_past(
    shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Keys and values of length 0, one per entry of ``shapes`` (kv heads, head dim)."""
    return [torch.zeros(batch, heads, 0, dim, dtype=dtype) for heads, dim in shapes]


def _names(layers: int, position_ids: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    past = tuple(f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))
    present = tuple(f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))
    head = ("input_ids", "attention_mask") + (("position_ids",) if position_ids else ())
    return head + past, ("logits",) + present


def _axes(
    inputs: tuple[str, ...], outputs: tuple[str, ...], last_token_logits: bool = False
) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name in inputs + outputs:
        if name.startswith("past_key_values."):
            axes[name] = {0: "batch", 2: "past_sequence"}
        elif name.startswith("present."):
            axes[name] = {0: "batch", 2: "total_sequence"}
        elif name == "attention_mask":
            axes[name] = {0: "batch", 1: "total_sequence"}
        elif name == "logits" and last_token_logits:
            axes[name] = {0: "batch"}
        else:  # input_ids, position_ids, logits
            axes[name] = {0: "batch", 1: "sequence"}
    return axes


def _compare(
    session: Any,
    names: tuple[str, ...],
    feed: tuple[torch.Tensor, ...],
    expected: tuple[torch.Tensor, ...],
    rtol: float,
    atol: float,
    what: str,
) -> float:
    try:
        got = session.run(None, {n: t.numpy() for n, t in zip(names, feed, strict=True)})
    except Exception as exc:
        raise ArtifactError(
            f"ONNX Runtime cannot run the export on {what}: {first_line(exc)}: "
            "check the model for a size fixed at the example's"
        ) from None
    expected_np = [e.numpy() for e in expected]
    return _worst_difference(
        expected_np, got, (rtol, atol), what, "check the model for a size fixed at the example's"
    )


def export_decoder_onnx(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    last_token_logits: bool = False,
    prefill_block: int | None = PREFILL_BLOCK,
) -> OnnxExport:
    """Write a transformers decoder LM as an ONNX file with its key/value cache (see the module
    docstring for the file's inputs and outputs), atomically, checked in ONNX Runtime.

    A CPU copy is exported in eval mode; ``model`` is untouched. Every axis but the layers'
    kv heads and head dimension is dynamic: batch, new tokens and past tokens. With ``check``,
    ONNX Runtime (CPU) must give PyTorch's logits, keys and values within
    ``|ort - torch| <= atol + rtol * |torch|`` on the example prompt with an empty past, on its
    last token decoded through the cache of the tokens before it, and on both again at twice the
    batch; otherwise nothing is written.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``) whose cache is a
            ``DynamicCache`` of keys and values (full, sliding-window or chunked attention)
            or of recurrent states beside them, structurally pruned or not. With recurrent
            states the file takes one token per call, or a block (``prefill_block``; see
            :mod:`._onnx_states`): ``input_ids`` (batch, 1 or the block) and each layer's
            ``past_key_values.{i}.conv.{s}`` and ``.recurrent.{s}`` state, zeros before the
            first token; it is checked on every
            token of the example, of twice its batch with padding and of a prompt up to 64
            tokens longer, and each row's last token against the model's own pass over the
            whole prompt. A model whose state before the first token is not zero fails that
            last check.
        example_inputs: ``{"input_ids": ids, "attention_mask": mask}``, ids of shape (batch,
            sequence) with sequence >= 4; the mask may pad on the left (or, for a model
            with recurrent states, the right) and defaults to ones.
        path: the ``.onnx`` file to write; missing parent folders are created.
        opset: ONNX opset, 9..20.
        check, rtol, atol: as for :func:`export_onnx`; a float16 model needs about
            ``rtol=atol=1e-2``. bfloat16 models are refused (cast them first).
        last_token_logits: return the logits of the last new token only, ``logits`` of shape
            (batch, 1, vocabulary), as transformers' ``generate`` computes them
            (``logits_to_keep=1``): a prompt then skips the LM head on all its other tokens,
            which with a large vocabulary is much of its cost. Generation needs no more. A
            file of recurrent states ignores it: its logits are its new tokens'.
        prefill_block: for a model with recurrent states, the file also takes blocks of
            this many prompt tokens per call (a second graph in the same file, sharing its
            weights; :class:`~secateur.measure.OnnxGenerator` feeds prompts so), where the
            model's prompt path continues from given states: checked in ONNX Runtime and
            against the model's pass over a prompt of two blocks and 3 tokens, or left out
            (``OnnxExport.prefill_block`` says which). It needs ``check`` and a model that
            takes prompts of ``2 * prefill_block + 3`` tokens. ``None``: a token per call.

    The file holds a tied embedding twice (the lookup table and the LM head's transposed copy)
    and, like :func:`export_onnx`, cannot exceed protobuf's 2 GiB.

    Returns:
        An :class:`OnnxExport`; ``max_abs_diff`` is the largest difference over the checks.

    Raises:
        ConfigError: bad path, opset, tolerance or inputs; a model that is not a transformers
            decoder with such a cache; onnxruntime missing while ``check`` is set.
        OutputError: the folder of ``path`` cannot be written.
        ArtifactError: the exporter cannot convert the model, or ONNX Runtime disagrees with
            PyTorch beyond tolerance (nothing is left on disk).

    Example:
        >>> ids = torch.randint(0, model.config.vocab_size, (1, 8))
        >>> export_decoder_onnx(model, {"input_ids": ids}, "llm.onnx").input_names[:3]
        ('input_ids', 'attention_mask', 'position_ids')
    """
    target = Path(path)
    _check_args(target, opset, rtol, atol)
    ensure_writable_dir(target.parent)
    ids, mask = _split(example_inputs)
    if prefill_block is not None and (
        isinstance(prefill_block, bool) or not isinstance(prefill_block, int) or prefill_block < 2
    ):
        raise ConfigError(f"prefill_block={prefill_block!r} must be an integer >= 2, or None")
    if check:
        _import_onnxruntime()
    if not callable(getattr(model, "forward", None)) or getattr(model, "config", None) is None:
        raise ConfigError("export_decoder_onnx takes a transformers model (one with a .config)")
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ConfigError(
            "ONNX Runtime's CPU kernels take no bfloat16: cast the model with .float() (or "
            ".half(), checked with rtol=atol=1e-2) before export_decoder_onnx"
        )
    clone = copy.deepcopy(model).cpu().eval()
    _traceable_experts_(clone)
    parameters = inspect.signature(clone.forward).parameters
    position_ids = "position_ids" in parameters
    if last_token_logits and "logits_to_keep" not in parameters:
        raise ConfigError(
            f"{type(model).__name__}'s forward takes no logits_to_keep, so its file cannot keep "
            "the last token's logits only: export it with last_token_logits=False"
        )
    with torch.no_grad():
        try:
            prompt = clone(input_ids=ids, attention_mask=mask, use_cache=True)
        except Exception as exc:
            raise ConfigError(
                f"{type(model).__name__} does not run on these inputs ({first_line(exc)}): "
                "pass token ids of its vocabulary and a mask of their shape"
            ) from None
    if getattr(prompt, "logits", None) is None:
        raise ConfigError(
            f"{type(model).__name__} returns no logits: export its language-model class "
            "(AutoModelForCausalLM), not the bare model"
        )
    cache = getattr(prompt, "past_key_values", None)
    if holds_states(cache):
        keyword = _cache_keyword(clone)
        tolerance = (rtol, atol) if check else None
        data, input_names, output_names, worst, block = export_states(
            clone, ids, mask, cache, position_ids, keyword, opset, tolerance, prefill_block
        )
    else:
        block = None
        data, input_names, output_names, worst = _export_keys_values(
            clone, ids, mask, cache, position_ids, last_token_logits, opset, (rtol, atol), check
        )
    atomic_write_bytes(target, data)
    return OnnxExport(
        path=target,
        opset=opset,
        input_names=input_names,
        output_names=output_names,
        max_abs_diff=worst,
        prefill_block=block,
    )


def _export_keys_values(
    clone: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    position_ids: bool,
    last_token_logits: bool,
    opset: int,
    tolerance: tuple[float, float],
    check: bool,
) -> tuple[bytes, tuple[str, ...], tuple[str, ...], float | None]:
    """The file of a cache of keys and values: its bytes, input and output names, and (with
    ``check``) the largest difference between ONNX Runtime and PyTorch."""
    layers = _cache_layers(cache, windowed=True)
    if any(type(ly).__name__ != "DynamicLayer" for ly in layers):
        _windowed_agrees(clone, ids, mask, tolerance)
    # (kv heads, head dim) of each layer's keys, then its values (they may differ)
    shapes = [(int(t.shape[1]), int(t.shape[3])) for ly in layers for t in (ly.keys, ly.values)]
    dtype = layers[0].keys.dtype
    wrapper = _WithCache(clone, len(layers), position_ids, last_token_logits).eval()
    input_names, output_names = _names(len(layers), position_ids)

    # traced with half the example as the past and half as new tokens: no size is 0 or 1,
    # which the tracer would fold into constants; the checks then use other sizes
    step_feed = _step(clone, ids, mask, position_ids, new=ids.shape[1] - ids.shape[1] // 2)
    data = _to_onnx_bytes(
        wrapper,
        step_feed,
        input_names,
        output_names,
        opset,
        _axes(input_names, output_names, last_token_logits),
    )
    worst = None
    if check:
        worst = _check(data, wrapper, ids, mask, shapes, dtype, input_names, tolerance)
    return data, input_names, output_names, worst


def _step(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, position_ids: bool, new: int = 1
) -> tuple[torch.Tensor, ...]:
    """The wrapper's inputs that decode the last ``new`` tokens through the cache of the
    others."""
    with torch.no_grad():
        head = model(
            input_ids=ids[:, :-new],
            attention_mask=mask[:, :-new],
            use_cache=True,
            **_full_cache(model),
        )
    past = [t for layer in _cache_layers(head.past_key_values) for t in (layer.keys, layer.values)]
    return _feed(ids[:, -new:], mask, [p.clone() for p in past], position_ids)


def _check(
    data: bytes,
    wrapper: _WithCache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    shapes: list[tuple[int, int]],
    dtype: torch.dtype,
    names: tuple[str, ...],
    tolerance: tuple[float, float],
) -> float:
    """The largest difference between ONNX Runtime and PyTorch on the prompt with an empty past
    and on its last token through the cache, at the example's batch and at twice it, and on a
    prompt :func:`longer_by` longer where PyTorch runs it."""
    session = _check_session(data)
    worst = 0.0
    # the added rows differ from the example's and pad one token on the left, so a graph that
    # mixes up rows or ignores the mask disagrees
    other_mask = mask.clone()
    other_mask[:, 0] = 0
    doubled = (
        torch.cat([ids, ids.roll(1, dims=1).flip(0)]),
        torch.cat([mask, other_mask]),
        "twice the batch, padded",
    )
    for batch_ids, batch_mask, size in ((ids, mask, "the example"), doubled):
        empty = _empty_past(shapes, batch_ids.shape[0], dtype)
        checks = {
            f"{size}'s prompt": _feed(batch_ids, batch_mask, empty, wrapper.position_ids),
            f"{size}'s last token through the cache": _step(
                wrapper.model, batch_ids, batch_mask, wrapper.position_ids
            ),
        }
        for what, feed in checks.items():
            with torch.no_grad():
                expected = wrapper(*[t.clone() for t in feed])
            worst = max(worst, _compare(session, names, feed, expected, *tolerance, what))
    # a longer prompt, past a chunk the trace may have frozen (up to the model's positions)
    if (extra := longer_by(wrapper.model, (ids,))) > 1:
        empty = _empty_past(shapes, ids.shape[0], dtype)

        def prompt(long_ids: torch.Tensor, long_mask: torch.Tensor) -> Any:
            feed = _feed(long_ids, long_mask, empty, wrapper.position_ids)
            return wrapper(*[t.clone() for t in feed])

        (long_ids, long_mask), expected = longest_run(prompt, (ids, mask), extra)
        if expected is not None:
            feed = _feed(long_ids, long_mask, empty, wrapper.position_ids)
            what = f"a prompt of {long_ids.shape[1]} tokens"
            worst = max(worst, _compare(session, names, feed, expected, *tolerance, what))
    return worst
