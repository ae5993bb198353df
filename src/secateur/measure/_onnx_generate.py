"""Greedy text generation in ONNX Runtime with a file from ``export_decoder_onnx``, or the pair
from ``export_seq2seq_onnx``.

:class:`OnnxGenerator` feeds the prompt once with an empty cache, then one token per step with
the keys and values the file returned, as transformers' ``generate`` does in PyTorch; so a pruned
LM's decoding speed can be measured, and its tokens compared, in the runtime it ships in. A file
of recurrent states (``input_ids`` of one token, or blocks of a size its metadata records) gets
the prompt as :func:`secateur.export._onnx_states.prompt_spans` splits it, its states starting
from zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError, ConfigError, first_line
from ..export._onnx_merge import BLOCK_KEY
from ..export._onnx_states import prompt_spans
from ._onnx import OnnxRunner

_PAST = "past_key_values."
_OWN = (".decoder.key", ".decoder.value")
_CROSS = (".encoder.key", ".encoder.value")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxGenerator:
    """Greedy decoding with a decoder LM file that takes and returns its cache (keys and
    values, and recurrent states where the model keeps them).

    Args:
        path: an ``.onnx`` file written by ``secateur.export.export_decoder_onnx``.
        threads, providers: as for :class:`OnnxRunner`.

    Attributes:
        runner: the :class:`OnnxRunner` on ``path``.

    Raises:
        ArtifactError: ``path`` is missing, corrupt, or not a file with ``input_ids``,
            ``attention_mask`` and ``past_key_values.*`` inputs.
        ConfigError: as for :class:`OnnxRunner`.

    Example:
        >>> generator = OnnxGenerator("llm.onnx", threads=2)
        >>> generator.generate(ids, max_new_tokens=16).shape  # prompt and 16 new tokens
        torch.Size([1, 24])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        self.runner = OnnxRunner(path, threads=threads, providers=providers)
        session = self.runner._session
        names = self.runner.input_names
        past = [i for i in session.get_inputs() if i.name.startswith(_PAST)]
        if "input_ids" not in names or "attention_mask" not in names or not past:
            raise ArtifactError(
                f"{self.runner.path.name} takes no key/value cache (inputs "
                f"{', '.join(names)}): write it with secateur.export.export_decoder_onnx"
            )
        self._position_ids = "position_ids" in names
        # a file of recurrent states takes one token per call, or a block (export_decoder_onnx)
        ids_shape = next(i.shape for i in session.get_inputs() if i.name == "input_ids")
        block = session.get_modelmeta().custom_metadata_map.get(BLOCK_KEY, "")
        self._block = int(block) if block.isdigit() and int(block) > 1 else None
        self._one_token = self._block is not None or (len(ids_shape) == 2 and ids_shape[1] == 1)
        self._past = _cache_slots(
            past, self.runner.path.name, "write the file with secateur.export.export_decoder_onnx"
        )
        self._outputs = self.runner.output_names

    def __repr__(self) -> str:
        return f"OnnxGenerator({str(self.runner.path)!r}, threads={self.runner.threads})"

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """The prompt followed by up to ``max_new_tokens`` greedily chosen tokens.

        Args:
            input_ids: (batch, sequence) token ids; pad on the left for prompts of different
                lengths, with ``attention_mask`` 0 there.
            attention_mask: (batch, sequence), 1 for tokens and 0 for padding; ones if ``None``.
            max_new_tokens: tokens to generate, >= 1.
            eos_token_id: an end token or a list of them (as in a transformers generation
                config); a row that produces one stops, and generation ends when every row
                has stopped. ``None``: always ``max_new_tokens``.
            pad_token_id: what a stopped row holds in its later places; the first end token
                if ``None``.

        Returns:
            (batch, sequence + new) token ids on ``input_ids``' device: those of transformers'
            ``generate(..., do_sample=False)`` given the same end and pad tokens and no logits
            processors (repetition penalty, n-gram blocking, bad words, minimum length are not
            applied here).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ConfigError("input_ids must be a (batch, sequence) tensor of token ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        ends = _end_tokens(eos_token_id)
        fill = ends[0] if pad_token_id is None and ends else pad_token_id
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ConfigError("attention_mask must have input_ids' shape")
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        full_mask = mask.detach().cpu().numpy().astype(np.int64)
        batch = ids.shape[0]
        past = [np.zeros((batch, *shape), dtype) for _, shape, dtype in self._past]
        new, mask_now, pending = ids, full_mask, None
        if self._one_token:  # a file of recurrent states: the prompt in spans
            attended = (full_mask != 0).all(0).tolist()
            for start, end in prompt_spans(attended, self._block):
                pending, past = self._call(ids[:, start:end], full_mask[:, :end], past)
        done = np.zeros(batch, dtype=bool)
        out = [ids]
        for _ in range(max_new_tokens):
            if pending is None:
                logits, past = self._call(new, mask_now, past)
            else:  # the prompt's last call gave the first token's logits
                logits, pending = pending, None
            token = logits[:, -1].argmax(-1).astype(np.int64)
            if ends:
                token = np.where(done, fill, token)
                done |= np.isin(token, ends)
            new = token[:, None]
            out.append(new)
            mask_now = np.concatenate([mask_now, np.ones((batch, 1), np.int64)], axis=1)
            if ends and done.all():
                break
        return torch.from_numpy(np.concatenate(out, axis=1)).to(input_ids.device)

    def _call(
        self, new: np.ndarray, mask: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One run of the file on the ``new`` tokens after ``past`` (``mask`` covers both):
        the logits and the cache after them."""
        feed = {"input_ids": new, "attention_mask": mask}
        if self._position_ids:
            positions = np.cumsum(mask, axis=-1) - 1
            positions[mask == 0] = 0
            feed["position_ids"] = positions[:, -new.shape[1] :]
        feed.update({name: p for (name, *_), p in zip(self._past, past, strict=True)})
        try:
            outputs = self.runner._session.run(None, feed)
        except Exception as exc:  # wrong dtype or size for the graph
            raise ConfigError(
                f"{self.runner.path.name} rejects these inputs ({first_line(exc)}): pass "
                "token ids and a mask of their shape, or export the file again"
            ) from None
        results = dict(zip(self._outputs, outputs, strict=True))
        present = [results["present." + name[len(_PAST) :]] for name, *_ in self._past]
        return results["logits"], present


def _cache_slots(inputs: list[Any], file: str, fix: str) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, shape after the batch, numpy dtype) of each cache input of a session, its growing
    axis (past tokens) as 0: the tensor before the first call. Keys and values are (batch,
    heads, past, head dim); a recurrent state has fixed sizes after the batch. A one-line
    :class:`ArtifactError` for keys or values whose heads or head size are not fixed numbers,
    a state with a size that is not, or an input of another type."""
    slots = []
    for i in inputs:
        shape = list(i.shape[1:])
        grows = [j for j, d in enumerate(shape) if not isinstance(d, int)]
        keys = i.name.endswith((".key", ".value"))
        if (
            i.type not in _DTYPES
            or (keys and (len(shape) != 3 or grows != [1]))
            or (grows and not keys)
        ):
            raise ArtifactError(
                f"{file}: input {i.name} has shape {i.shape} and type {i.type}: {fix}"
            )
        slots.append(
            (i.name, tuple(0 if j in grows else d for j, d in enumerate(shape)), _DTYPES[i.type])
        )
    return slots


def _end_tokens(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The end tokens as a list (empty for ``None``), or a one-line :class:`ConfigError`."""
    if eos_token_id is None:
        return []
    values = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if (
        isinstance(eos_token_id, (bool, str, bytes))
        or not isinstance(values, Sequence)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise ConfigError(
            f"eos_token_id={eos_token_id!r} must be a token id or a non-empty list of them"
        )
    return [int(v) for v in values]


class OnnxSeq2SeqGenerator:
    """Greedy decoding with the ``encoder.onnx`` and ``decoder.onnx`` that
    ``secateur.export.export_seq2seq_onnx`` writes: the encoder runs once, then the decoder one
    token per step through its own cache and the encoder's cross-attention keys and values.

    Args:
        folder: the folder holding both files.
        threads, providers: as for :class:`OnnxRunner`, for each session.

    Attributes:
        encoder, decoder: the :class:`OnnxRunner` on each file.
        decoder_start_token_id: the start token recorded in the files at export.

    Raises:
        ArtifactError: a file is missing, corrupt, or not one of such a pair.
        ConfigError: as for :class:`OnnxRunner`.

    Example:
        >>> generator = OnnxSeq2SeqGenerator("t5-onnx", threads=2)
        >>> generator.generate({"input_ids": ids}, max_new_tokens=16).shape  # start + 16
        torch.Size([1, 17])
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        root = Path(folder)
        self.encoder = OnnxRunner(root / "encoder.onnx", threads=threads, providers=providers)
        self.decoder = OnnxRunner(root / "decoder.onnx", threads=threads, providers=providers)
        fix = "write the pair with secateur.export.export_seq2seq_onnx"
        meta = self.decoder._session.get_modelmeta().custom_metadata_map
        start = meta.get("decoder_start_token_id", "")
        own = [i for i in self.decoder._session.get_inputs() if i.name.endswith(_OWN)]
        if (
            not start.lstrip("-").isdigit()
            or "input_ids" not in self.decoder.input_names
            or not own
        ):
            raise ArtifactError(f"{self.decoder.path} is not a decoder file with a cache: {fix}")
        if "encoder_hidden_states" not in self.encoder.output_names:
            raise ArtifactError(f"{self.encoder.path} is not an encoder file: {fix}")
        self.decoder_start_token_id = int(start)
        self._own = _cache_slots(own, self.decoder.path.name, fix)

    def __repr__(self) -> str:
        return f"OnnxSeq2SeqGenerator({str(self.decoder.path.parent)!r})"

    def generate(
        self,
        inputs: Mapping[str, torch.Tensor] | torch.Tensor,
        *,
        max_new_tokens: int = 20,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """The start token followed by up to ``max_new_tokens`` greedily chosen tokens.

        Args:
            inputs: the encoder's inputs as at export (``{"input_ids": ids, "attention_mask":
                mask}``, or Whisper's ``{"input_features": x}``); a tensor is taken as
                ``input_ids``, with a mask of ones.
            max_new_tokens, eos_token_id, pad_token_id: as for :meth:`OnnxGenerator.generate`.

        Returns:
            (batch, 1 + new) decoder token ids on the inputs' device: those of transformers'
            ``generate(..., do_sample=False)`` given the same end and pad tokens and no logits
            processors.
        """
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs}
        if not isinstance(inputs, Mapping) or not inputs:
            raise ConfigError("inputs must be the encoder's tensors by name, or input_ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        feed = dict(inputs)
        if "input_ids" in feed and "attention_mask" in self.encoder.input_names:
            feed.setdefault("attention_mask", torch.ones_like(feed["input_ids"]))
        missing = [n for n in self.encoder.input_names if n not in feed]
        if missing:
            raise ConfigError(f"the encoder needs input {missing[0]!r}: pass it in inputs")
        device = next(iter(feed.values())).device
        arrays = {n: _numpy(feed[n], n) for n in self.encoder.input_names}
        encoded = dict(zip(self.encoder.output_names, self._run(self.encoder, arrays), strict=True))
        batch = encoded["encoder_hidden_states"].shape[0]
        ends = _end_tokens(eos_token_id)
        fill = ends[0] if pad_token_id is None and ends else pad_token_id
        fixed = {"encoder_hidden_states": encoded["encoder_hidden_states"]}
        if "attention_mask" in arrays:
            fixed["encoder_attention_mask"] = arrays["attention_mask"]
        for name in self.decoder.input_names:
            if name.endswith(_CROSS):
                fixed[name] = encoded["present." + name[len(_PAST) :]]
        fixed = {n: v for n, v in fixed.items() if n in self.decoder.input_names}
        own = [np.zeros((batch, *shape), dtype) for _, shape, dtype in self._own]
        token = np.full((batch, 1), self.decoder_start_token_id, np.int64)
        out = [token]
        done = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            step = {"input_ids": token, **fixed}
            step.update({name: p for (name, *_), p in zip(self._own, own, strict=True)})
            results = dict(
                zip(self.decoder.output_names, self._run(self.decoder, step), strict=True)
            )
            next_token = results["logits"][:, -1].argmax(-1).astype(np.int64)
            if ends:
                next_token = np.where(done, fill, next_token)
                done |= np.isin(next_token, ends)
            token = next_token[:, None]
            out.append(token)
            own = [results["present." + name[len(_PAST) :]] for name, *_ in self._own]
            if ends and done.all():
                break
        return torch.from_numpy(np.concatenate(out, axis=1)).to(device)

    @staticmethod
    def _run(runner: OnnxRunner, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return runner._session.run(None, feed)
        except Exception as exc:  # wrong dtype or size for the graph
            raise ConfigError(
                f"{runner.path.name} rejects these inputs ({first_line(exc)}): pass the "
                "encoder's inputs as at export, or export the pair again"
            ) from None


def _numpy(tensor: Any, name: str) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{name} must be a tensor")
    array = tensor.detach().cpu().numpy()
    return array.astype(np.int64) if name in ("input_ids", "attention_mask") else array
