"""Export a transformers encoder-decoder (T5, BART, Marian, Whisper, ...) to two ONNX files that
generate through the key/value caches.

:func:`export_onnx` writes one file that runs encoder and decoder over the whole sequence on every
call. :func:`export_seq2seq_onnx` writes the pair that generation needs, in one folder:

- ``encoder.onnx`` runs the encoder once per input and returns ``encoder_hidden_states`` and each
  decoder layer's cross-attention keys and values, ``present.{i}.encoder.key`` /
  ``present.{i}.encoder.value`` (batch, heads, encoder sequence, head dim). It holds the encoder
  and the decoder's cross-attention key and value projections, nothing more of the decoder.
- ``decoder.onnx`` takes the new decoder tokens ``input_ids`` (batch, sequence),
  ``encoder_attention_mask`` (when the encoder takes a mask), ``encoder_hidden_states`` (when the
  decoder reads more than the cached keys and values from it), its own past keys and values
  ``past_key_values.{i}.decoder.key`` / ``.value`` (length 0 on the first call) and the
  cross-attention ones ``past_key_values.{i}.encoder.key`` / ``.value``; it returns ``logits``
  and ``present.{i}.decoder.key`` / ``.value`` extended by the new tokens.

So every step costs one decoder pass over one token, as in transformers' ``generate``; the
cross-attention keys and values are computed once. :class:`secateur.measure.OnnxSeq2SeqGenerator`
runs the pair greedily. The decoder start token is recorded in both files' metadata.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write_bytes, ensure_writable_dir
from ..errors import ArtifactError, ConfigError, OutputError, first_line
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
from ._onnx_decoder import _cache_keyword

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
START_KEY = "decoder_start_token_id"
_ENCODER_INPUTS = ("input_ids", "attention_mask", "input_features")
_FIX = "check the model for a size fixed at the example's"


@dataclass(frozen=True)
class Seq2SeqOnnxExport:
    """What :func:`export_seq2seq_onnx` wrote: the two files and the decoder start token.

    ``max_abs_diff`` of each is the largest difference between ONNX Runtime and PyTorch over its
    checks, or ``None`` when unchecked.
    """

    encoder: OnnxExport
    decoder: OnnxExport
    decoder_start_token_id: int


def _empty_cache() -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def _layers(cache: Any) -> tuple[list[Any], list[Any]]:
    """The self- and cross-attention layers of a transformers ``EncoderDecoderCache`` of plain
    key/value layers, else a one-line :class:`ConfigError`."""
    from transformers import EncoderDecoderCache
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, EncoderDecoderCache) or not all(
        isinstance(c, DynamicCache)
        for c in (cache.self_attention_cache, cache.cross_attention_cache)
    ):
        raise ConfigError(
            f"the model keeps its cache as {type(cache).__name__}, not an EncoderDecoderCache of "
            "DynamicCaches: use export_onnx (no cache) for this model"
        )
    own, cross = list(cache.self_attention_cache.layers), list(cache.cross_attention_cache.layers)
    kinds = {type(ly).__name__ for ly in own + cross if type(ly) is not DynamicLayer}
    if kinds or len(own) != len(cross) or not own:
        raise ConfigError(
            f"the model's cache holds {', '.join(sorted(kinds)) or 'unpaired'} layers, which "
            "export_seq2seq_onnx does not write: use export_onnx (no cache) for this model"
        )
    return own, cross


class _Encoder(nn.Module):
    """Runs the model's encoder and one decoder step on the start token; returns the encoder's
    output and every layer's cross-attention keys and values (the decoder's other work does not
    reach the outputs, so the exporter drops it)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...], start: int) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.start = start

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.keys, tensors, strict=True))
        batch = tensors[0].shape[0]
        start = torch.full((batch, 1), self.start, dtype=torch.long, device=tensors[0].device)
        encoded = _encode(self.model, inputs)
        out = _first_step(self.model, inputs, encoded, start)
        _, cross = _layers(out.past_key_values)
        flat = [encoded[0]]
        for layer in cross:
            flat += [layer.keys, layer.values]
        return tuple(flat)


class _Decoder(nn.Module):
    """Runs the decoder on new tokens through its own cache and the cross-attention cache."""

    def __init__(self, model: nn.Module, layers: int, masked: bool, kind: type) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.masked = masked
        self.kind = kind  # the encoder's output class

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        ids = tensors[0]
        mask = tensors[1] if self.masked else None
        hidden = tensors[2 if self.masked else 1]
        past = tensors[3 if self.masked else 2 :]
        n = self.layers
        own = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)])
        cross = DynamicCache(
            ddp_cache_data=[(past[2 * n + 2 * i], past[2 * n + 2 * i + 1]) for i in range(n)]
        )
        kwargs: dict[str, Any] = {_cache_keyword(self.model): EncoderDecoderCache(own, cross)}
        if mask is not None:
            kwargs["attention_mask"] = mask
        out = self.model(
            encoder_outputs=self.kind(last_hidden_state=hidden),
            decoder_input_ids=ids,
            use_cache=True,
            **kwargs,
        )
        own_layers, _ = _layers(out.past_key_values)
        flat = [out.logits]
        for layer in own_layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


def _encode(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, type]:
    """The encoder alone, called as ``generate`` calls it (Switch Transformers' encoder refuses
    the ``use_cache`` that a whole-model call with a cache passes on): its states, and the class
    of output it returns, which the decoder is given back (mixture-of-experts models read their
    ``router_logits`` by name, so neither a tuple nor a plain ``BaseModelOutput`` will do)."""
    out = model.get_encoder()(**inputs, return_dict=True)
    return out.last_hidden_state, type(out)


def _first_step(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    encoded: tuple[torch.Tensor, type],
    tokens: torch.Tensor,
) -> Any:
    """The decoder's run on ``tokens`` over the encoder's states, filling an empty cache."""
    hidden, kind = encoded
    mask = {"attention_mask": inputs["attention_mask"]} if "attention_mask" in inputs else {}
    return model(
        encoder_outputs=kind(last_hidden_state=hidden),
        decoder_input_ids=tokens,
        use_cache=True,
        **{_cache_keyword(model): _empty_cache()},
        **mask,
    )


def _split(example_inputs: Any) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not (
        {"input_ids", "input_features"} & set(example_inputs)
    ):
        raise ConfigError(
            "export_seq2seq_onnx takes example_inputs={'input_ids': ids, 'attention_mask': "
            "mask} (or Whisper's {'input_features': features})"
        )
    unknown = sorted(set(example_inputs) - set(_ENCODER_INPUTS))
    if unknown:
        raise ConfigError(
            f"export_seq2seq_onnx takes the encoder's inputs only ({', '.join(_ENCODER_INPUTS)})"
            f", not {unknown[0]!r}: drop it; the decoder's tokens are chosen by the export"
        )
    inputs = {k: example_inputs[k] for k in _ENCODER_INPUTS if k in example_inputs}
    for name, tensor in inputs.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or min(tensor.shape[:2]) < 1:
            raise ConfigError(f"{name} must be a tensor of shape (batch, sequence, ...)")
    ids = inputs.get("input_ids")
    if ids is not None:
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ConfigError(
                "input_ids must be a (batch, sequence) tensor of at least 2 tokens: a length of "
                "1 would be traced as a constant"
            )
        mask = inputs.setdefault("attention_mask", torch.ones_like(ids))
        if mask.shape != ids.shape:
            raise ConfigError("attention_mask must be a tensor of input_ids' shape")
        inputs["input_ids"] = ids.long()
        inputs["attention_mask"] = mask.long()
    return {k: v.detach().cpu() for k, v in inputs.items()}


def _start_token(model: nn.Module) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        start = getattr(source, START_KEY, None)
        if isinstance(start, int) and not isinstance(start, bool):
            return start
    raise ConfigError(
        f"{type(model).__name__} names no decoder_start_token_id in its config or generation "
        "config: set model.config.decoder_start_token_id"
    )


def export_seq2seq_onnx(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Seq2SeqOnnxExport:
    """Write a transformers encoder-decoder as ``encoder.onnx`` and ``decoder.onnx`` in
    ``folder`` (see the module docstring for their inputs and outputs), checked in ONNX Runtime.

    A CPU copy is exported in eval mode; ``model`` is untouched. Batch, encoder length (not
    Whisper's fixed frames), decoder tokens and past are dynamic; each layer's pruned head count
    and head size are fixed in the files. With ``check``, ONNX Runtime (CPU) must give PyTorch's
    outputs within ``|ort - torch| <= atol + rtol * |torch|`` for the encoder on the example and
    on twice its batch (padded on the right), and for the decoder's first step (the start token,
    an empty past) and a later token through the cache of three, at both batches; otherwise
    nothing is written. The files are each written atomically; if the second cannot be written,
    the first is removed.

    Args:
        model: a transformers ``AutoModelForSeq2SeqLM`` (or Whisper's
            ``WhisperForConditionalGeneration``) whose cache is an ``EncoderDecoderCache`` of
            plain keys and values, structurally pruned or not.
        example_inputs: the encoder's inputs, ``{"input_ids": ids, "attention_mask": mask}``
            (ids of at least 2 tokens; the mask defaults to ones) or ``{"input_features": x}``.
        folder: where the two files go; created if missing.
        opset, check, rtol, atol: as for :func:`export_onnx`.

    Returns:
        A :class:`Seq2SeqOnnxExport`.

    Raises:
        ConfigError: bad folder, opset, tolerance or inputs; a model that is not such an
            encoder-decoder; onnxruntime missing while ``check`` is set.
        OutputError: the folder cannot be written.
        ArtifactError: the exporter cannot convert the model, or ONNX Runtime disagrees with
            PyTorch beyond tolerance (nothing is left on disk).

    Example:
        >>> out = export_seq2seq_onnx(t5, {"input_ids": ids}, "t5-onnx")
        >>> out.decoder.path.name, out.decoder_start_token_id
        ('decoder.onnx', 0)
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} is a file: pass a folder for encoder.onnx and decoder.onnx")
    _check_args(target / ENCODER_FILE, opset, rtol, atol)
    inputs = _split(example_inputs)
    if check:
        _import_onnxruntime()
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            "export_seq2seq_onnx takes a transformers encoder-decoder (is_encoder_decoder in its "
            "config): use export_decoder_onnx for a decoder-only LM"
        )
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ConfigError(
            "ONNX Runtime's CPU kernels take no bfloat16: cast the model with .float() before "
            "export_seq2seq_onnx"
        )
    start = _start_token(model)
    clone = copy.deepcopy(model).cpu().eval()
    _traceable_experts_(clone)
    keys = tuple(inputs)
    with torch.no_grad():
        try:
            hidden, kind = _encode(clone, inputs)
            natural = _first_step(clone, inputs, (hidden, kind), _tokens(clone, start, inputs, 1))
        except Exception as exc:
            raise ConfigError(
                f"{type(model).__name__} does not run on these inputs ({first_line(exc)}): pass "
                "its encoder's inputs"
            ) from None
    if getattr(natural, "logits", None) is None:
        raise ConfigError(
            f"{type(model).__name__} returns no logits: export its generation class "
            "(AutoModelForSeq2SeqLM), not the bare model"
        )
    own, cross = _layers(natural.past_key_values)
    # (heads, head dim) of each layer's own keys, then values
    shapes = [(int(t.shape[1]), int(t.shape[3])) for ly in own for t in (ly.keys, ly.values)]
    # what the encoder file returns: the encoder's output and the cross-attention keys, values
    encoded = (hidden,) + tuple(t for ly in cross for t in (ly.keys, ly.values))
    layers = len(own)
    encoder = _Encoder(clone, keys, start).eval()
    decoder = _Decoder(clone, layers, "attention_mask" in inputs, kind).eval()
    enc_names = keys
    enc_outputs = ("encoder_hidden_states",) + _kv_names("present", layers, "encoder")
    traced_names = _decoder_inputs(decoder)
    dec_outputs = ("logits",) + _kv_names("present", layers, "decoder")

    encoder_bytes = _to_onnx_bytes(
        encoder,
        tuple(inputs.values()),
        enc_names,
        enc_outputs,
        opset,
        _axes(enc_names + enc_outputs),
    )
    # traced on 2 new tokens through 2 cached ones: no size is 0 or 1, which would be frozen
    step = _decoder_feed(decoder, inputs, encoded, _tokens(clone, start, inputs, 4), 2, shapes)
    decoder_bytes = _to_onnx_bytes(
        decoder, step, traced_names, dec_outputs, opset, _axes(traced_names + dec_outputs)
    )
    encoder_bytes, _ = _with_start(encoder_bytes, start)
    decoder_bytes, dec_names = _with_start(decoder_bytes, start)
    worst: tuple[float | None, float | None] = (None, None)
    if check:
        files = (encoder_bytes, decoder_bytes)
        worst = _check(files, encoder, decoder, dec_names, inputs, shapes, (rtol, atol))
    ensure_writable_dir(target)
    encoder_path, decoder_path = target / ENCODER_FILE, target / DECODER_FILE
    atomic_write_bytes(encoder_path, encoder_bytes)
    try:
        atomic_write_bytes(decoder_path, decoder_bytes)
    except OutputError:
        encoder_path.unlink(missing_ok=True)
        raise
    return Seq2SeqOnnxExport(
        encoder=OnnxExport(encoder_path, opset, enc_names, enc_outputs, worst[0]),
        decoder=OnnxExport(decoder_path, opset, dec_names, dec_outputs, worst[1]),
        decoder_start_token_id=start,
    )


def _kv_names(prefix: str, layers: int, part: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for kv in ("key", "value"))


def _decoder_inputs(decoder: _Decoder) -> tuple[str, ...]:
    """The decoder wrapper's inputs by name, in order (the file may drop
    ``encoder_hidden_states``)."""
    return (
        ("input_ids",)
        + (("encoder_attention_mask",) if decoder.masked else ())
        + ("encoder_hidden_states",)
        + _kv_names("past_key_values", decoder.layers, "decoder")
        + _kv_names("past_key_values", decoder.layers, "encoder")
    )


def _axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Dynamic axes of both files' inputs and outputs, by name."""
    axes: dict[str, dict[int, str]] = {}
    for name in names:
        if name == "input_features":  # Whisper's frames are fixed
            axes[name] = {0: "batch"}
        elif name in ("attention_mask", "encoder_attention_mask", "encoder_hidden_states"):
            axes[name] = {0: "batch", 1: "encoder_sequence"}
        elif name.endswith((".encoder.key", ".encoder.value")):
            axes[name] = {0: "batch", 2: "encoder_sequence"}
        elif name.startswith("past_key_values."):
            axes[name] = {0: "batch", 2: "past_sequence"}
        elif name.startswith("present."):
            axes[name] = {0: "batch", 2: "total_sequence"}
        elif name == "input_ids" and "encoder_hidden_states" not in names:
            axes[name] = {0: "batch", 1: "encoder_sequence"}  # the encoder's tokens
        else:  # the decoder's input_ids, logits
            axes[name] = {0: "batch", 1: "sequence"}
    return axes


def _tokens(model: nn.Module, start: int, inputs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """``n`` decoder tokens per row: the start token, then small ids that differ by row."""
    batch = next(iter(inputs.values())).shape[0]
    vocab = int(getattr(model.config, "vocab_size", 0) or 4)
    rows = torch.arange(batch)[:, None] + torch.arange(1, n)[None, :]
    head = torch.full((batch, 1), start, dtype=torch.long)
    return torch.cat([head, rows % vocab], dim=1)[:, :n]


def _decoder_feed(
    decoder: _Decoder,
    inputs: dict[str, torch.Tensor],
    encoded: tuple[torch.Tensor, ...],
    tokens: torch.Tensor,
    new: int,
    shapes: list[tuple[int, int]],
) -> tuple[torch.Tensor, ...]:
    """The decoder file's inputs that run the last ``new`` of ``tokens`` through the cache of
    the others (an empty one when there are none)."""
    model, hidden, cross = decoder.model, encoded[0], list(encoded[1:])
    mask = inputs.get("attention_mask")
    batch = tokens.shape[0]
    if tokens.shape[1] == new:
        past = [torch.zeros(batch, h, 0, d, dtype=hidden.dtype) for h, d in shapes]
    else:
        with torch.no_grad():
            head = _first_step(model, inputs, (hidden, decoder.kind), tokens[:, :-new])
        own, _ = _layers(head.past_key_values)
        past = [t.clone() for ly in own for t in (ly.keys, ly.values)]
    head_inputs = (tokens[:, -new:],) + ((mask,) if mask is not None else ()) + (hidden,)
    return head_inputs + tuple(past) + tuple(c.clone() for c in cross)


def _with_start(data: bytes, start: int) -> tuple[bytes, tuple[str, ...]]:
    """The file with the decoder start token in its metadata, and its input names (the exporter
    drops an input the graph does not read, such as ``encoder_hidden_states`` in a decoder
    that takes all it needs from the cached keys and values)."""
    import onnx

    proto = onnx.load_from_string(data)
    entry = proto.metadata_props.add()
    entry.key, entry.value = START_KEY, str(start)
    return proto.SerializeToString(), tuple(i.name for i in proto.graph.input)


def _variants(
    encoder: _Encoder, inputs: dict[str, torch.Tensor]
) -> dict[str, tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...] | None]]:
    """The example, twice its batch with other rows padded on the right, and for token inputs
    a sequence twice as long and one up to :func:`longer_by` longer: each with the encoder's
    outputs where they are already known (``None`` where the caller still has to run it)."""
    doubled = {}
    for name, tensor in inputs.items():
        other = tensor.flip(0)
        if name == "input_ids":
            other = other.roll(1, dims=1)
        elif name == "attention_mask":
            other = other.clone()
            other[:, -1] = 0
        elif tensor.is_floating_point():
            other = other * 0.5
        doubled[name] = torch.cat([tensor, other])
    variants: dict[str, tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...] | None]] = {
        "the example": (inputs, None),
        "twice the batch, padded": (doubled, None),
    }
    if "input_ids" in inputs:
        longer = {k: torch.cat([v, v.flip(1)], dim=1) for k, v in inputs.items()}
        variants["a longer input"] = (longer, None)
        # past a chunk or block the trace may have frozen (LongT5's local attention); where
        # the model refuses that length, as much shorter as it runs
        extra = longer_by(encoder.model, tuple(inputs.values()))
        if extra > 1:
            far, encoded = longest_run(encoder, tuple(inputs.values()), extra)
            if encoded is not None:
                far_inputs = dict(zip(inputs, far, strict=True))
                extra = far_inputs["input_ids"].shape[1] - inputs["input_ids"].shape[1]
                variants[f"an input {extra} tokens longer"] = (far_inputs, encoded)
    return variants


def _check(
    files: tuple[bytes, bytes],
    encoder: _Encoder,
    decoder: _Decoder,
    decoder_names: tuple[str, ...],
    inputs: dict[str, torch.Tensor],
    shapes: list[tuple[int, int]],
    tolerance: tuple[float, float],
) -> tuple[float, float]:
    """The largest differences between ONNX Runtime and PyTorch, encoder then decoder."""
    sessions = [_check_session(data) for data in files]
    all_names = _decoder_inputs(decoder)
    worst = [0.0, 0.0]
    for size, (variant, encoded) in _variants(encoder, inputs).items():
        if encoded is None:
            with torch.no_grad():
                encoded = encoder(*variant.values())
        got = _run(sessions[0], dict(zip(encoder.keys, variant.values(), strict=True)), size)
        expected = [t.numpy() for t in encoded]
        worst[0] = max(worst[0], _worst_difference(expected, got, tolerance, size, _FIX))
        tokens = _tokens(decoder.model, encoder.start, variant, 4)
        steps = {f"{size}'s first decoder step": tokens[:, :1], f"{size}'s fourth": tokens}
        for what, step_tokens in steps.items():
            feed = _decoder_feed(decoder, variant, encoded, step_tokens, 1, shapes)
            with torch.no_grad():
                expected = [t.numpy() for t in decoder(*feed)]
            named = dict(zip(all_names, feed, strict=True))
            got = _run(sessions[1], {n: named[n] for n in decoder_names}, what)
            worst[1] = max(worst[1], _worst_difference(expected, got, tolerance, what, _FIX))
    return worst[0], worst[1]


def _run(session: Any, feed: dict[str, torch.Tensor], what: str) -> list[Any]:
    try:
        return session.run(None, {n: t.numpy() for n, t in feed.items()})
    except Exception as exc:
        raise ArtifactError(
            f"ONNX Runtime cannot run the export on {what}: {first_line(exc)}: {_FIX}"
        ) from None
