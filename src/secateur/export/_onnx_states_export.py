"""Writing and checking the file of :mod:`._onnx_states`, with blocks of prompt tokens where
the model allows them.

The file always takes one token per call. Given ``block``, it also takes ``block`` prompt
tokens per call: a second graph, traced at that many new tokens, runs them through the model's
prompt path from the states of the tokens before (Mamba2's chunked scan, Gated DeltaNet's
chunked delta rule, a convolution over the new tokens after the old ones). Both graphs share
one file and its weights (:mod:`._onnx_merge`); ``input_ids`` of one token per row pick the
first. A prompt then costs ``len / block`` calls instead of ``len``.

That path is kept only where the check shows the model's prompt path continues from given
states: every call of a prompt of two blocks and 3 tokens, in ONNX Runtime and in PyTorch, and
its logits against the model's own pass over the whole prompt (relative error within
``rtol``); a model that does not run a prompt that long gets no blocks, and a warning says why
blocks were left out. transformers' Mamba (and Jamba's Mamba layers) start their prompt path
afresh whatever the cache holds, so their files stay a token at a time; Mamba2, Gated
DeltaNet, LFM2 and the hybrids continue. Where a model pads its chunked scan to a chunk
(Mamba2's 256 tokens), a block costs about a whole chunk, so larger blocks, up to the chunk,
gain more per call.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, first_line
from ._onnx import _check_session, _to_onnx_bytes, _worst_difference, longer_by, longest_run
from ._onnx_merge import merge_by_length
from ._onnx_states import (
    LONGER_BY_STEPS,
    StatefulStep,
    _axes,
    fed,
    names,
    prompt_spans,
    state_plan,
)

_FIX = "check the model for a size fixed at the example's"
#: prompt tokens per call of a file's block graph, by default
PREFILL_BLOCK = 64
# (ids, mask, the model's own logits on the whole prompt, or None)
Prompt = tuple[torch.Tensor, torch.Tensor, Any]


def _input_names(data: bytes) -> tuple[str, ...]:
    """The file's inputs: the exporter drops one the graph does not read (position_ids
    without rotary embeddings)."""
    import onnx

    return tuple(i.name for i in onnx.load_from_string(data).graph.input)


def export_states(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prompt_cache: Any,
    position_ids: bool,
    cache_keyword: str,
    opset: int,
    tolerance: tuple[float, float] | None,
    block: int | None,
) -> tuple[bytes, tuple[str, ...], tuple[str, ...], float | None, int | None]:
    """The file's bytes, input and output names, (with a ``tolerance``) the largest difference
    between ONNX Runtime and PyTorch, and the prompt tokens its block graph takes (``None``:
    a token at a time). Blocks need the check: without a ``tolerance`` the file has none.
    A :class:`ConfigError` for a cache of another kind, an :class:`ArtifactError` where the
    file or the single-token path disagrees."""
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
    axes = _axes(slots, position_ids)
    one = _to_onnx_bytes(step, trace_feed, input_names, output_names, opset, axes)
    if tolerance is None:
        return one, _input_names(one), output_names, None, None
    long = _long_prompt(step.model, ids, mask)
    if block is not None:
        graphs = (one, input_names, output_names, opset, axes)
        tried = _try_blocks(step, graphs, ids, mask, block, tolerance, long)
        if not isinstance(tried, str):
            return (*tried, block)
        warnings.warn(
            f"the file of {type(model).__name__} takes one token per call, not blocks of "
            f"{block}: {tried}",
            UserWarning,
            stacklevel=3,  # the export_decoder_onnx call
        )
    kept = _input_names(one)
    worst = _check(one, step, ids, mask, input_names, kept, tolerance, long)
    return one, kept, output_names, worst, None


def _try_blocks(step, graphs, ids, mask, block, tolerance, long):  # noqa: ANN001, ANN202
    """The file with its block graph, checked: ``(bytes, input names, output names, largest
    difference)``, or why it cannot have one. ``graphs``: the single-token file's bytes, its
    input and output names, the opset and the dynamic axes."""
    one, input_names, output_names, opset, axes = graphs
    blocks = _block_prompt(step.model, ids, block)
    if blocks is None:
        return f"the model does not run a prompt of {2 * block + 3} tokens"
    merged = _with_blocks(step, one, blocks[0], input_names, output_names, opset, axes, block)
    if isinstance(merged, str):
        return merged
    kept = _input_names(merged)
    try:
        worst = _check_blocks(merged, step, blocks, input_names, kept, tolerance, block)
        worst = max(worst, _check(merged, step, ids, mask, input_names, kept, tolerance, long))
    except (ArtifactError, ConfigError) as exc:
        return str(exc)
    except Exception as exc:  # PyTorch failing at a size the trace did not use
        return f"its prompt path fails in blocks ({type(exc).__name__}: {first_line(exc)})"
    return merged, kept, output_names, worst


def _long_prompt(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Prompt | None:
    """A prompt up to :data:`LONGER_BY_STEPS` tokens longer than the example, every token
    attended, with the model's logits over it; ``None`` where the model takes none longer."""
    extra = min(longer_by(model, (ids,)), LONGER_BY_STEPS)
    if extra <= 1:
        return None
    # every token attended: repeating the example's mask would put pads mid-prompt
    (long_ids, long_mask), whole = longest_run(_whole(model), (ids, torch.ones_like(mask)), extra)
    return None if whole is None else (long_ids, long_mask, whole)


def _block_prompt(model: nn.Module, ids: torch.Tensor, block: int) -> Prompt | None:
    """The example's tokens repeated to two blocks and 3 tokens, every token attended, with the
    model's logits over them; ``None`` where the model takes no prompt that long."""
    length = 2 * block + 3
    tiled = ids.repeat(1, -(-length // ids.shape[1]))[:, :length]
    ones = torch.ones_like(tiled)
    try:
        with torch.no_grad():
            return tiled, ones, _whole(model)(tiled, ones)
    except Exception:  # the model refuses the length after all: no blocks
        return None


def _with_blocks(step, one, long_ids, input_names, output_names, opset, axes, block):  # noqa: ANN001, ANN202
    """The single-token file ``one`` merged with the graph traced at ``block`` new tokens
    after 3 single ones (at a batch of 2 or more), or why PyTorch, the exporter or the merge
    cannot make it."""
    rows = long_ids if long_ids.shape[0] > 1 else torch.cat([long_ids, long_ids.flip(0)])
    rows = rows[:, : 3 + block]
    spans = [(0, 1), (1, 2), (2, 3), (3, 3 + block)]
    try:
        feed = fed(step, rows, torch.ones_like(rows), spans)[-1][0]
        data = _to_onnx_bytes(step, feed, input_names, output_names, opset, axes)
        merged = merge_by_length(one, data, block)
    except Exception as exc:  # the model's prompt path takes no states, or does not trace
        return f"the block graph cannot be made ({first_line(exc)})"
    return "the two graphs do not merge" if merged is None else merged


def _run_calls(session, calls, input_names, kept, tolerance, what) -> float:  # noqa: ANN001
    """Run each ``(feed, PyTorch outputs)`` of ``calls`` in ``session``; the largest
    difference, or an :class:`ArtifactError` naming the call beyond ``tolerance``."""
    worst = 0.0
    for t, (feed, expected) in enumerate(calls):
        where = f"{what}'s call {t + 1} through the cache"
        try:
            named = dict(zip(input_names, feed, strict=True))
            got = session.run(None, {n: named[n].numpy() for n in kept})
        except Exception as exc:
            raise ArtifactError(
                f"ONNX Runtime cannot run the export on {where}: {first_line(exc)}: {_FIX}"
            ) from None
        worst = max(
            worst, _worst_difference([e.numpy() for e in expected], got, tolerance, where, _FIX)
        )
    return worst


def _check_blocks(
    data: bytes,
    step: StatefulStep,
    long: Prompt,
    input_names: tuple[str, ...],
    kept: tuple[str, ...],
    tolerance: tuple[float, float],
    block: int,
) -> float:
    """The largest difference between ONNX Runtime and PyTorch when the ``long`` prompt (two
    blocks and 3 tokens) goes in blocks, and again at twice the batch with rows padded on the
    left (whose padded tokens go a token at a time); the long prompt's logits in blocks must be
    the model's over the whole prompt (an :class:`ArtifactError` otherwise)."""
    session = _check_session(data)
    long_ids, long_mask, whole = long
    padded = long_mask.clone()
    padded[:, :3] = 0
    prompts: dict[str, Prompt] = {
        "the prompt in blocks": (long_ids, long_mask, whole),
        "twice the batch in blocks, padded": (
            torch.cat([long_ids, long_ids.flip(0)]),
            torch.cat([long_mask, padded]),
            None,
        ),
    }
    worst = 0.0
    for what, (batch_ids, batch_mask, logits) in prompts.items():
        spans = prompt_spans(batch_mask.bool().all(0).tolist(), block)
        calls = fed(step, batch_ids, batch_mask, spans)
        worst = max(worst, _run_calls(session, calls, input_names, kept, tolerance, what))
        for (start, end), (_, out) in zip(spans, calls, strict=True):
            if logits is None:
                continue
            # a path that does not continue from the states is off by the logits' own size;
            # float error between the chunkings stays far below rtol
            whole = logits[:, start:end]
            error = float((out[0] - whole).norm() / whole.norm().clamp_min(1e-12))
            if error > tolerance[0]:
                raise ArtifactError(
                    f"its prompt path in blocks gives other logits than on the whole prompt "
                    f"(relative error {error:.3g} at tokens {start + 1}-{end})"
                )
    return worst


def _check(
    data: bytes,
    step: StatefulStep,
    ids: torch.Tensor,
    mask: torch.Tensor,
    input_names: tuple[str, ...],
    kept: tuple[str, ...],
    tolerance: tuple[float, float],
    long: Prompt | None,
) -> float:
    """The largest difference between ONNX Runtime and PyTorch over every call that feeds the
    example token by token, again at twice the batch with rows padded on the left, and the
    ``long`` prompt (past a size the trace may have frozen in the attention layers); and each
    row's logits at its last token of the example and of the long prompt against the model's
    own pass over the whole prompt."""
    session = _check_session(data)
    other_mask = mask.clone()
    other_mask[:, 0] = 0
    prompts: dict[str, Prompt] = {
        "the example": (ids, mask, _whole_logits(step.model, ids, mask)),
        # the padded rows follow the file's rule for pads, not the prompt pass's
        "twice the batch, padded": (
            torch.cat([ids, ids.roll(1, dims=1).flip(0)]),
            torch.cat([mask, other_mask]),
            None,
        ),
    }
    if long is not None:
        prompts[f"a prompt of {long[0].shape[1]} tokens"] = long
    worst = 0.0
    for what, (batch_ids, batch_mask, whole) in prompts.items():
        calls = _steps(step, batch_ids, batch_mask, what)
        worst = max(worst, _run_calls(session, calls, input_names, kept, tolerance, what))
        if whole is not None:
            _agrees_with_whole(step.model, whole, batch_mask, calls, tolerance)
    return worst


def _whole(model: nn.Module) -> Any:
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    return run


def _steps(step: StatefulStep, ids: torch.Tensor, mask: torch.Tensor, what: str) -> list:
    """:func:`fed` a token at a time, or a one-line :class:`ConfigError` where PyTorch
    fails."""
    try:
        return fed(step, ids, mask)
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
