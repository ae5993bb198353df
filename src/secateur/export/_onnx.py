"""Export a PyTorch model to an ONNX file, checked against PyTorch in ONNX Runtime.

The TorchScript exporter is used (``torch.onnx.export(..., dynamo=False)``): the dynamo exporter
needs ``onnxscript``, which secateur does not depend on. It traces one forward pass, so
data-dependent Python control flow is frozen at the example's values; the check below runs the
file on the example batch, on inputs with other values (token ids rolled, features flipped),
which catches a choice those values made (a router's experts, a loop's length), and, with a
dynamic batch, on a batch twice as large, which catches a batch size baked into the graph.

Names in the file: inputs are ``input`` (one tensor), ``input_0``, ``input_1``, ... (a sequence of
tensors) or the keys of a dict of keyword tensors (HF style, e.g. ``input_ids``, which is what
ONNX Runtime users of such models expect); outputs are ``output`` (one tensor) or ``output_0``,
``output_1``, ... in the order the model returns them (a HF ``ModelOutput`` gives its non-``None``
fields in order, e.g. ``logits`` first). Axis 0 of every input and output is named ``batch``.

Hugging Face models: BERT-like encoders export as they are; for decoders (GPT-2, Llama) the copy
that is exported has ``config.use_cache = False``, because the KV cache the model returns
otherwise (a ``DynamicCache`` object) cannot be a traced output. Only the batch axis is dynamic
unless ``dynamic_sequence`` is set; without it, such a file takes the example's sequence length.
Encoder-decoder models (T5, BART, Whisper, ...) export as one file that runs the encoder and the
decoder on each call (no cache); give the encoder's and the decoder's inputs different lengths in
the example and ``dynamic_sequence`` keeps the two lengths independent.

A failed conversion raises one line; the IR graph the exporter prints on failure is not shown.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write_bytes, ensure_writable_dir
from .._expert_loop import loop_over_experts_, loops_over_experts
from .._experts import expert_stacks
from ..errors import ArtifactError, ConfigError, first_line
from ._onnx_rewrites import exportable_ops

DEFAULT_OPSET = 17
# how much longer than the example a dynamic_sequence file is also checked at: crosses a
# boundary of any chunk or block of up to this many tokens that the trace may have frozen
LONGER_BY = 257
_VALUE_FIX = "check the model for untraceable control flow, or raise the tolerance"
_MIN_OPSET = 9
_MAX_OPSET = 20  # the TorchScript exporter's highest (torch.onnx._constants)
# token ids -> the mask that spares transformers its torch.diff (no ONNX form) when given
_MASKS = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    ``max_abs_diff`` is the largest absolute difference between ONNX Runtime's and PyTorch's
    outputs over the checked inputs (the example, other values, twice the batch, ...), or
    ``None`` when the export was not checked. ``prefill_block`` is, for a decoder file of
    recurrent states, how many prompt tokens a call may take beside one (``None``: one).
    """

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_abs_diff: float | None
    prefill_block: int | None = None


class _Flat(nn.Module):
    """Calls ``model`` with positional or keyword tensors and returns a flat tuple of tensors."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...] | None) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.keys is None:
            out = self.model(*tensors)
        else:
            out = self.model(**dict(zip(self.keys, tensors, strict=True)))
        return tuple(_flatten(out))


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, Mapping):  # includes HF ModelOutput, whose values() skip None fields
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item)]
    raise ConfigError(
        f"the model returns a {type(out).__name__}, which ONNX cannot hold: "
        "export a wrapper module that returns tensors"
    )


def _split(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """(tensors, keyword names or None) of ``example_inputs``."""
    if isinstance(example_inputs, torch.Tensor):
        tensors: tuple[Any, ...] = (example_inputs,)
        keys = None
    elif isinstance(example_inputs, Mapping):
        keys = tuple(str(k) for k in example_inputs)
        tensors = tuple(example_inputs.values())
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        tensors, keys = tuple(example_inputs), None
    else:
        tensors, keys = (), None
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ConfigError(
            "example_inputs must be a tensor, a sequence of tensors or a dict of tensors"
        )
    return tuple(t.detach().cpu() for t in tensors), keys


def _input_names(count: int, keys: tuple[str, ...] | None) -> tuple[str, ...]:
    if keys is not None:
        return keys
    return ("input",) if count == 1 else tuple(f"input_{i}" for i in range(count))


def _output_names(count: int) -> tuple[str, ...]:
    return ("output",) if count == 1 else tuple(f"output_{i}" for i in range(count))


def _sequence_groups(
    input_names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]
) -> list[tuple[str, tuple[int, ...]]]:
    """(axis name, input indices) per independent sequence axis.

    Inputs of 2 or more dims whose axis 1 has the same length in the example share one axis
    (token ids and their attention mask); inputs of another length get their own (an
    encoder-decoder's ``decoder_input_ids``). One group is named ``sequence``; with several, each
    is named after its first input, e.g. ``decoder_input_ids_sequence``.
    """
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(tensors):
        if x.dim() >= 2:
            by_length.setdefault(int(x.shape[1]), []).append(i)
    groups = list(by_length.values())
    if len(groups) == 1:
        return [("sequence", tuple(groups[0]))]
    return [(f"{input_names[g[0]]}_sequence", tuple(g)) for g in groups]


def _lengthened(
    tensors: tuple[torch.Tensor, ...], indices: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, ...]:
    """The inputs with axis 1 (the sequence) twice as long, each repeated along it: those at
    ``indices``, or every input of 2 or more dims when ``indices`` is ``None``."""
    return tuple(
        torch.cat([x, x], dim=1) if x.dim() >= 2 and (indices is None or i in indices) else x
        for i, x in enumerate(tensors)
    )


def _run_lengthened(
    flat: _Flat, tensors: tuple[torch.Tensor, ...], indices: tuple[int, ...], names: list[str]
) -> tuple[torch.Tensor, ...]:
    """The model's outputs with the inputs at ``indices`` twice as long on axis 1."""
    try:
        with torch.no_grad():
            return flat(*_lengthened(tensors, indices))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the model does not run with axis 1 of {', '.join(names)} twice as long "
            f"({first_line(exc)}): dynamic_sequence takes axis 1 of every input of 2 or more "
            "dims for a sequence; drop it for a model whose axis 1 is not one or is fixed"
        ) from None


def _dynamic_axes(
    flat: _Flat,
    tensors: tuple[torch.Tensor, ...],
    outputs: tuple[torch.Tensor, ...],
    names: tuple[tuple[str, ...], tuple[str, ...]],
    dynamic_batch: bool,
    dynamic_sequence: bool,
) -> dict[str, dict[int, str]]:
    """Axis names per input and output: ``batch`` on axis 0; a sequence name (see
    :func:`_sequence_groups`) on axis 1 of every input of 2 or more dims, and on each output axis
    whose size follows that group (found by running the model with that group twice as long)."""
    input_names, output_names = names
    axes: dict[str, dict[int, str]] = {n: {} for n in input_names + output_names}
    if dynamic_batch:
        for n in axes:
            axes[n][0] = "batch"
    if dynamic_sequence:
        if not any(x.dim() >= 2 for x in tensors):
            raise ConfigError(
                "dynamic_sequence needs an input of shape (batch, sequence, ...): pass such "
                "example inputs or drop dynamic_sequence"
            )
        groups = _sequence_groups(input_names, tensors)
        for _, indices in groups:
            names_in = {input_names[i] for i in indices}
            if {"input_ids", "decoder_input_ids"} <= names_in:
                raise ConfigError(
                    "input_ids and decoder_input_ids have the same length in example_inputs, "
                    "so dynamic_sequence would tie the two lengths: give decoder_input_ids "
                    "another length"
                )
        for axis_name, indices in groups:
            for i in indices:
                axes[input_names[i]][1] = axis_name
            longer = _run_lengthened(flat, tensors, indices, [input_names[i] for i in indices])
            for name, short, long in zip(output_names, outputs, longer, strict=True):
                for axis in range(1, short.dim()):
                    if short.shape[axis] != long.shape[axis]:
                        axes[name].setdefault(axis, axis_name)
    return {n: a for n, a in axes.items() if a}


def _check_args(path: Path, opset: int, rtol: float, atol: float) -> None:
    if path.suffix != ".onnx":
        raise ConfigError(f"ONNX path {path} must end in .onnx: rename it, e.g. {path.stem}.onnx")
    if (
        isinstance(opset, bool)
        or not isinstance(opset, int)
        or not _MIN_OPSET <= opset <= _MAX_OPSET
    ):
        raise ConfigError(
            f"opset={opset!r} is not supported: use an integer {_MIN_OPSET}..{_MAX_OPSET}"
        )
    if not (rtol >= 0 and atol >= 0):
        raise ConfigError(f"rtol={rtol} and atol={atol} must be >= 0")


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "checking an ONNX export needs onnxruntime: pip install 'secateur[onnx]' or pass check=False"
        ) from None
    return onnxruntime


def _to_onnx_bytes(
    flat: _Flat,
    tensors: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    opset: int,
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    if dynamic_axes:
        kwargs["dynamic_axes"] = dynamic_axes
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the legacy exporter's deprecation notice, and tracer warnings that the check makes moot
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        try:
            with _graph_dump_off(), exportable_ops():
                torch.onnx.export(
                    flat,
                    tensors,
                    buffer,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    opset_version=opset,
                    do_constant_folding=True,
                    **kwargs,
                )
        except (ConfigError, ArtifactError):  # ours, already naming the problem and the fix
            raise
        except Exception as exc:  # an operator or construct the exporter cannot convert
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fix = "try another opset or replace the unsupported operation"
            missing = [
                m for ids, m in _MASKS.items() if ids in input_names and m not in input_names
            ]
            if "aten::diff" in first and missing:
                # transformers looks for packed sequences with torch.diff when no mask is given
                fix = f"pass {' and '.join(missing)} beside the token ids in the example inputs"
            raise ArtifactError(
                f"cannot export {type(flat.model).__name__} to ONNX (opset {opset}): {first}: {fix}"
            ) from exc
    return buffer.getvalue()


@contextlib.contextmanager
def _graph_dump_off() -> Any:
    """Silence the TorchScript exporter's dump of its whole IR graph (hundreds of lines on
    standard output) when a conversion fails: its ``setup_onnx_logging`` tests the function
    ``_jit_is_onnx_log_enabled`` for truth instead of calling it, so the log is always on
    during an export. Only that Python-side log call is replaced, for the export's duration."""
    log = getattr(torch._C, "_jit_onnx_log", None)
    if log is None:  # a torch without it: nothing to silence
        yield
        return
    torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = log


def _ort_outputs(session: Any, names: tuple[str, ...], tensors: Sequence[torch.Tensor]) -> list:
    feed = {n: t.numpy() for n, t in zip(names, tensors, strict=True)}
    return session.run(None, feed)


def _compare(
    session: Any,
    flat: _Flat,
    tensors: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    rtol: float,
    atol: float,
    what: str,
    fix: str = "pass dynamic_batch=False if the model fixes its batch size",
    outputs: tuple[torch.Tensor, ...] | None = None,
    value_fix: str = _VALUE_FIX,
) -> float:
    """The largest difference between ONNX Runtime and PyTorch on ``tensors`` (PyTorch's
    ``outputs`` when already computed), or a one-line :class:`ArtifactError` ending in ``fix``
    when the file cannot run them, in ``value_fix`` when its values differ."""
    if outputs is None:
        with torch.no_grad():
            outputs = flat(*tensors)
    expected = [t.numpy() for t in outputs]
    try:
        got = _ort_outputs(session, input_names, tensors)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(
            f"ONNX Runtime cannot run the export on {what}: {first}: {fix}"
        ) from None
    shape_fix = "pass dynamic_batch=False or simplify forward()"
    if value_fix != _VALUE_FIX:  # a check with its own cause: a size differs for it too
        shape_fix = value_fix
    return _worst_difference(expected, got, (rtol, atol), what, shape_fix, value_fix)


def _worst_difference(
    expected: Sequence[np.ndarray],
    got: Sequence[np.ndarray],
    tolerance: tuple[float, float],
    what: str,
    shape_fix: str,
    value_fix: str = "",
) -> float:
    """The largest ``|got - expected|`` over all outputs, or a one-line :class:`ArtifactError`
    for a shape that differs or a value beyond ``atol + rtol * |expected|``."""
    rtol, atol = tolerance
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e.shape != g.shape:
            raise ArtifactError(
                f"ONNX output {i} has shape {g.shape}, PyTorch {e.shape} on {what}: "
                f"the traced graph fixes a size; {shape_fix}"
            )
        if e.size == 0:
            continue
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= atol + rtol * np.abs(e.astype(np.float64))):
            raise ArtifactError(
                f"ONNX output {i} differs from PyTorch by up to {float(diff.max()):.3g} on {what} "
                f"(rtol={rtol}, atol={atol}): {value_fix or _VALUE_FIX}"
            )
    return worst


def _check_session(data: bytes) -> Any:
    """An ONNX Runtime CPU session on ``data`` whose own log is quiet (a failed run is raised
    in one line by the caller), or a one-line :class:`ArtifactError`."""
    ort = _import_onnxruntime()
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(
            f"ONNX Runtime cannot load the export: {first_line(exc)}: try another opset"
        ) from None


def _other_values(
    tensors: tuple[torch.Tensor, ...], input_names: tuple[str, ...]
) -> tuple[torch.Tensor, ...] | None:
    """The inputs with other values of the same kind, or ``None`` where none can be made: token
    ids (``*input_ids``) rolled by one position, floating inputs of 2 or more dims that are not
    masks flipped along their last axis. Running the file on them catches a trace that froze
    what the example's values decided (the experts a router reached, a data-dependent loop)."""
    varied, changed = [], False
    for name, x in zip(input_names, tensors, strict=True):
        other = x
        if name.endswith("input_ids") and x.dim() >= 2:
            other = x.roll(1, dims=1)
        elif x.is_floating_point() and x.dim() >= 2 and "mask" not in name:
            other = x.flip(-1)
        changed = changed or not torch.equal(other, x)
        varied.append(other)
    return tuple(varied) if changed else None


def _outputs_unless_refused(
    flat: _Flat, tensors: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...] | None:
    """PyTorch's outputs on ``tensors``, or ``None`` when the model refuses them (e.g. token ids
    it expects in fixed places): such inputs are then not checked."""
    try:
        with torch.no_grad():
            return flat(*tensors)
    except Exception:  # noqa: BLE001 - a refusal means only: no such check
        return None


def _check(
    data: bytes,
    flat: _Flat,
    tensors: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    dynamic_batch: bool,
    dynamic_sequence: bool,
    rtol: float,
    atol: float,
) -> float:
    session = _check_session(data)
    worst = _compare(session, flat, tensors, input_names, rtol, atol, "the example inputs")
    if dynamic_batch and all(t.dim() > 0 for t in tensors):
        doubled = tuple(torch.cat([t, t]) for t in tensors)
        batch = doubled[0].shape[0]
        worst = max(
            worst, _compare(session, flat, doubled, input_names, rtol, atol, f"a batch of {batch}")
        )
    varied = _other_values(tensors, input_names)
    expected = None if varied is None else _outputs_unless_refused(flat, varied)
    if varied is not None and expected is not None:
        what = "inputs with other values (token ids rolled, features flipped)"
        fix = (
            "the trace froze a choice the example's values made; make forward() not branch on "
            "them (check=False writes the file unchecked)"
        )
        worst = max(
            worst, _compare(session, flat, varied, input_names, rtol, atol, what, fix, expected)
        )
    if dynamic_sequence:
        longer = _lengthened(tensors)
        what = f"a sequence of {max(x.shape[1] for x in longer if x.dim() >= 2)}"
        worst = max(worst, _compare(session, flat, longer, input_names, rtol, atol, what))
        groups = _sequence_groups(input_names, tensors)
        for axis_name, indices in groups if len(groups) > 1 else ():
            alone = _lengthened(tensors, indices)
            what = f"only {axis_name} twice as long"
            worst = max(worst, _compare(session, flat, alone, input_names, rtol, atol, what))
        # one longer: twice a length can still be a multiple of what the trace froze (Mamba2's
        # chunked scan, padded to a multiple of its chunk); LONGER_BY more: a short example
        # fits in one chunk, and so do twice and one more (Gated DeltaNet's chunks of 64)
        fix = (
            "the trace froze a length the example's made (a padding to a multiple, a loop's "
            "count); export without dynamic_sequence, at the length the file will run"
        )
        for extra in sorted({1, longer_by(flat.model, tensors)}):
            longer, expected = longest_run(flat, tensors, extra)
            if expected is not None:
                what = f"a sequence of {max(x.shape[1] for x in longer if x.dim() >= 2)}"
                worst = max(
                    worst,
                    _compare(
                        session, flat, longer, input_names, rtol, atol, what, fix, expected, fix
                    ),
                )
    return worst


_POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_source_positions")


def longer_by(model: nn.Module, tensors: Sequence[torch.Tensor]) -> int:
    """How much longer than the example a sequence check runs: LONGER_BY, or up to the
    positions ``model``'s config declares (a table past them is the model's own limit)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in _POSITION_LIMITS]
    limits = [v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    length = max((t.shape[1] for t in tensors if t.dim() >= 2), default=0)
    return max(1, min([LONGER_BY, *(v - length for v in limits)]))


def longest_run(
    run: Callable[..., Any], tensors: tuple[torch.Tensor, ...], extra: int
) -> tuple[tuple[torch.Tensor, ...], Any]:
    """The inputs :func:`_cycled` ``extra`` longer and ``run``'s outputs on them; where ``run``
    refuses that length (a table of positions shorter than its config says: RoBERTa's starts
    past its padding index), half as much longer, down to one; ``None`` outputs if it refuses
    every one."""
    while True:
        longer = _cycled(tensors, extra)
        try:
            with torch.no_grad():
                return longer, run(*longer)
        except Exception:  # noqa: BLE001 - a refusal means only: try shorter
            if extra <= 1:
                return longer, None
            extra //= 2


def _cycled(tensors: tuple[torch.Tensor, ...], extra: int) -> tuple[torch.Tensor, ...]:
    """The inputs of 2 or more dims ``extra`` longer on axis 1, their own entries repeated."""
    out = []
    for x in tensors:
        if x.dim() >= 2 and x.shape[1] > 0:
            length = x.shape[1] + extra
            x = torch.cat([x] * -(-length // x.shape[1]), dim=1)[:, :length]
        out.append(x)
    return tuple(out)


def _without_cache_(model: nn.Module) -> None:
    """Turn off the KV cache of every HF config in ``model``: a returned cache object cannot be
    a traced output. Encoder-decoder models keep a separate config copy in each stack."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False


def _traceable_experts_(model: nn.Module) -> None:
    """Run a transformers MoE model's experts in a form a trace keeps: expert by expert
    (:mod:`secateur._expert_loop`) where the experts module is one it knows, else as ``batched_mm``
    (one gathered matrix per token, a static graph): ``grouped_mm`` counts tokens per expert
    with ``histc``, which ONNX lacks, and ``eager`` loops over the experts the example happened
    to reach, which a trace would freeze."""
    loop_over_experts_(model)
    switch = getattr(model, "set_experts_implementation", None)
    others = [m for _, m in expert_stacks(model).values() if not loops_over_experts(m)]
    if others and callable(switch):
        with contextlib.suppress(ValueError, RuntimeError):  # a model that cannot switch
            switch("batched_mm")


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> OnnxExport:
    """Write ``model`` as an ONNX file at ``path`` (atomically) and check it in ONNX Runtime.

    A CPU copy of the model is exported in eval mode; ``model`` itself, its device and its mode
    are untouched. With ``check``, ONNX Runtime (CPU) runs the file on ``example_inputs``, on
    them with other values (``*input_ids`` rolled by a position, floating inputs of 2 or more
    dims not named as masks flipped along their last axis), and, if ``dynamic_batch``, on them
    repeated to twice the batch; every output must satisfy
    ``|ort - torch| <= atol + rtol * |torch|``; otherwise nothing is written. Models of several
    GiB (over protobuf's 2 GiB limit) are not supported.

    Args:
        model: any module whose forward takes tensors and returns tensors (or a tuple, list, dict
            or HF ``ModelOutput`` of them).
        example_inputs: a tensor, a sequence of positional tensors, or a dict of keyword tensors
            (HF style), batch first, on any device.
        path: the ``.onnx`` file to write; missing parent folders are created.
        opset: ONNX opset, 9..20.
        dynamic_batch: name axis 0 of every input and output ``batch`` so any batch size runs.
        dynamic_sequence: name axis 1 of every input of 2 or more dims ``sequence``, and each
            output axis that follows it, so that any sequence length runs (token ids of a text
            model); checked, like the batch, on inputs twice as long, and on inputs one longer
            where PyTorch runs them. Inputs whose axis 1 has another length in the example get
            an axis of their own, named after the first such input (``input_ids_sequence``,
            ``decoder_input_ids_sequence``), each checked alone.

    Returns:
        An :class:`OnnxExport` with the names used and the measured ``max_abs_diff``.

    Raises:
        ConfigError: ``path`` does not end in ``.onnx``, a bad opset or tolerance, inputs or
            outputs that are not tensors, ``dynamic_sequence`` for a model that does not run
            with axis 1 twice as long, or onnxruntime missing while ``check`` is set.
        OutputError: the folder of ``path`` cannot be written.
        ArtifactError: the exporter cannot convert the model, or ONNX Runtime's outputs differ
            from PyTorch's beyond tolerance (nothing is left on disk).

    Example:
        >>> from secateur.zoo import create_model
        >>> out = export_onnx(create_model("lenet5"), torch.zeros(1, 1, 28, 28), "lenet5.onnx")
        >>> out.input_names, out.output_names
        (('input',), ('output',))
    """
    target = Path(path)
    _check_args(target, opset, rtol, atol)
    ensure_writable_dir(target.parent)  # fail before the (possibly long) export
    tensors, keys = _split(example_inputs)
    if check:
        _import_onnxruntime()
    clone = copy.deepcopy(model).cpu().eval()
    _without_cache_(clone)
    _traceable_experts_(clone)
    flat = _Flat(clone, keys).eval()
    with torch.no_grad():
        outputs = flat(*tensors)
    if not outputs:
        raise ConfigError("the model returns no tensor: export a module that returns its output")
    input_names = _input_names(len(tensors), keys)
    output_names = _output_names(len(outputs))
    names = (input_names, output_names)
    axes = _dynamic_axes(flat, tensors, outputs, names, dynamic_batch, dynamic_sequence)
    data = _to_onnx_bytes(flat, tensors, input_names, output_names, opset, axes)
    worst = None
    if check:
        worst = _check(
            data, flat, tensors, input_names, dynamic_batch, dynamic_sequence, rtol, atol
        )
    atomic_write_bytes(target, data)
    return OnnxExport(
        path=target,
        opset=opset,
        input_names=input_names,
        output_names=output_names,
        max_abs_diff=worst,
    )
