"""int8 post-training quantization of an ONNX file with ``onnxruntime.quantization``.

Two modes:

* ``QuantMode.DYNAMIC``: weights are stored int8 (per output channel by default); activations
  are quantized on the fly, batch by batch, from their observed range. No data needed. Every
  MatMul/Gemm/Conv (and recurrent/attention ops) gets int8 weights.
* ``QuantMode.STATIC``: activation ranges are fixed beforehand from calibration batches (min/max
  of each tensor), written in QDQ format (QuantizeLinear/DequantizeLinear pairs around int8
  tensors, the form ONNX Runtime fuses into int8 kernels), int8 activations and int8 weights.

Weights are quantized to 7 bits (``reduce_range``) where the CPU has no VNNI int8 dot product
(x86 with AVX2 or AVX-512 only): ONNX Runtime's u8s8 kernels there sum pairs of products in
16 bits, which saturate with full 8-bit weights. Measured on an AVX2-only EPYC (the tests'
models): a pruned LeNet-5's static int8 agreed with fp32 on 83% of the test digits with 8-bit
weights and on 99% with 7-bit ones; a small Mixtral's dynamic int8 logits moved by 8.3% and 2.1%.

The file is first run through ``quant_pre_process`` (symbolic shape inference and graph
optimisation), as ONNX Runtime recommends; if that fails for a graph, quantization proceeds on
the original file.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write_bytes, ensure_writable_dir
from .._calibration import iter_calibration
from ..errors import ArtifactError, ConfigError, first_line

DEFAULT_MAX_BATCHES = 16


class QuantMode(str, enum.Enum):
    """How activations are quantized: on the fly (``dynamic``) or from calibration (``static``)."""

    DYNAMIC = "dynamic"
    STATIC = "static"


_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_needs_reduce_range(cpuinfo: str | None = None) -> bool:
    """Whether int8 weights should keep to 7 bits on this machine: an x86 CPU without VNNI.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when ``None``); where it cannot be
    read, an x86 CPU is assumed to lack VNNI (7-bit weights cost little accuracy, saturation
    much) and any other (ARM's int8 dot products do not saturate) to need nothing."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return not _VNNI_FLAGS & set(line.partition(":")[2].split())
    return True


def _modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime.quantization as ortq
    except ImportError:
        raise ConfigError(
            "ONNX quantization needs onnx and onnxruntime: pip install 'secateur[onnx]'"
        ) from None
    return onnx, ortq


def _graph_inputs(onnx: Any, src: Path) -> list[str]:
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends for a damaged file
        raise ArtifactError(
            f"cannot read ONNX file {src} (truncated or corrupt?): {first_line(exc)}: "
            "export it again with secateur.export.export_onnx"
        ) from None
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not names:
        raise ArtifactError(f"ONNX file {src} has no graph input: export it again")
    return names


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _feeds(
    calibration: Any, names: list[str], input_name: str | None, max_batches: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """One ``{input name: array}`` per calibration batch (targets dropped)."""
    for inputs, _ in iter_calibration(calibration, device="cpu", max_batches=max_batches):
        if isinstance(inputs, dict):
            unknown = [k for k in inputs if k not in names]
            if unknown:
                raise ConfigError(
                    f"calibration input {unknown[0]!r} is not an input of the ONNX graph: "
                    f"use {', '.join(names)}"
                )
            yield {k: _numpy(v) for k, v in inputs.items()}
        elif isinstance(inputs, torch.Tensor):
            yield {input_name or names[0]: _numpy(inputs)}
        elif isinstance(inputs, (tuple, list)) and len(inputs) <= len(names):
            yield {n: _numpy(v) for n, v in zip(names, inputs, strict=False)}
        else:
            raise ConfigError(
                "calibration inputs must be tensors, tuples of tensors or dicts of tensors, "
                f"one per ONNX graph input ({', '.join(names)})"
            )


def _reader(ortq: Any, feeds: Iterator[dict[str, np.ndarray]]) -> Any:
    class _Reader(ortq.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    return _Reader()


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    """``contextlib.chdir`` for Python 3.10: the process's working directory, for the block."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _quantizer_warnings_off() -> Iterator[None]:
    """ONNX Runtime's quantizer logs a warning through the root logger for every tensor it
    leaves float because it is not a float (e.g. the token positions ``NonZero`` finds in an
    MoE file): dozens of multi-line messages about nothing wrong. The root logger's level is
    raised for the block (process-wide while it lasts) and restored after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _pre_process(ortq: Any, src: Path, folder: Path) -> Path:
    src, out = src.resolve(), (folder / "pre.onnx").resolve()  # before leaving the cwd
    try:
        # ONNX Runtime's symbolic shape inference saves a "sym_shape_infer_temp.onnx" (and
        # its external data) into the working directory when it gives up: run it from the
        # temporary folder, so nothing is left beside the user's files
        with _working_dir(folder):
            ortq.quant_pre_process(str(src), str(out))
    except Exception:  # shape inference cannot handle every graph; quantizing still works
        return src
    return out if out.is_file() else src


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: QuantMode | str = QuantMode.DYNAMIC,
    calibration: Any = None,
    per_channel: bool = True,
    input_name: str | None = None,
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    reduce_range: bool | None = None,
) -> Path:
    """Write an int8-quantized copy of the ONNX file ``src`` to ``dst`` (atomically).

    Args:
        src: an fp32 ``.onnx`` file, e.g. from ``secateur.export.export_onnx``.
        dst: the ``.onnx`` file to write (may equal ``src``); missing folders are created.
        mode: ``QuantMode.DYNAMIC`` (no data) or ``QuantMode.STATIC`` (needs ``calibration``);
            the strings ``"dynamic"``/``"static"`` are accepted too.
        calibration: for static mode, batches as ``secateur._calibration.iter_calibration``
            takes them: an iterable of input tensors or ``(inputs, targets)`` pairs (inputs may
            be a tuple or dict of tensors for several graph inputs), or a data ``Split``, read
            in batches of 128. Ignored in dynamic mode.
        per_channel: one weight scale per output channel (more accurate) instead of per tensor.
        input_name: the graph input that bare tensor batches feed; default its first input.
        max_batches: at most this many calibration batches are read (``None``: all); the
            min/max calibrator holds every activation of every batch in memory.
        reduce_range: quantize weights to 7 bits, for x86 CPUs without VNNI, where full 8-bit
            weights saturate ONNX Runtime's int8 kernels; ``None`` (default) decides by this
            machine's CPU (:func:`cpu_needs_reduce_range`). Quantizing for another machine,
            set it for that one.

    Returns:
        ``dst`` as a ``Path``; the file loads in ``secateur.measure.OnnxRunner``.

    Raises:
        ConfigError: ``dst`` not ending in ``.onnx``, an unknown mode, static mode without
            calibration, calibration inputs that do not match the graph, or onnx/onnxruntime
            missing.
        ArtifactError: ``src`` missing or corrupt, or ONNX Runtime failing to quantize it.
        OutputError: the folder of ``dst`` cannot be written.

    Example:
        >>> quantize_onnx("lenet5.onnx", "lenet5.int8.onnx")  # dynamic
        PosixPath('lenet5.int8.onnx')
        >>> quantize_onnx("lenet5.onnx", "lenet5.qdq.onnx", mode="static", calibration=[x])
        PosixPath('lenet5.qdq.onnx')
    """
    source, target = Path(src), Path(dst)
    if target.suffix != ".onnx":
        raise ConfigError(f"quantized path {target} must end in .onnx: e.g. {target.stem}.onnx")
    try:
        mode = QuantMode(mode)
    except ValueError:
        raise ConfigError(
            f"quantization mode={mode!r} is unknown: use one of "
            f"{', '.join(m.value for m in QuantMode)}"
        ) from None
    if mode is QuantMode.STATIC and calibration is None:
        raise ConfigError(
            "static int8 quantization needs calibration data: pass calibration=[batch, ...] "
            "or a data split, or use mode='dynamic'"
        )
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches={max_batches} must be >= 1 or None")
    if not source.is_file():
        raise ArtifactError(f"no ONNX file at {source}: export one with export_onnx first")
    onnx, ortq = _modules()
    names = _graph_inputs(onnx, source)
    if mode is QuantMode.STATIC and _has_branches(onnx, source):
        raise ConfigError(
            f"static int8 quantization does not reach the graphs inside {source.name}'s If "
            "(a decoder file that takes prompt blocks): use mode='dynamic', or export it "
            "with prefill_block=None"
        )
    if input_name is not None and input_name not in names:
        raise ConfigError(
            f"input_name={input_name!r} is not a graph input: use one of {', '.join(names)}"
        )
    ensure_writable_dir(target.parent)
    reduce = cpu_needs_reduce_range() if reduce_range is None else bool(reduce_range)
    with tempfile.TemporaryDirectory(prefix="secateur-quant-") as tmp:
        folder = Path(tmp)
        with _quantizer_warnings_off():
            prepared = _pre_process(ortq, source, folder)
        out = folder / "int8.onnx"
        try:
            with _quantizer_warnings_off():
                if mode is QuantMode.DYNAMIC:
                    ortq.quantize_dynamic(
                        str(prepared),
                        str(out),
                        per_channel=per_channel,
                        weight_type=ortq.QuantType.QInt8,
                        reduce_range=reduce,
                        # the branches of an If (a decoder's single-token and block graphs)
                        extra_options={"EnableSubgraph": True},
                    )
                else:
                    feeds = _feeds(calibration, names, input_name, max_batches)
                    first = next(feeds, None)
                    if first is None:
                        raise ConfigError(
                            "calibration yielded no batch: pass at least one batch of inputs"
                        )
                    feeds = itertools.chain([first], feeds)
                    ortq.quantize_static(
                        str(prepared),
                        str(out),
                        _reader(ortq, feeds),
                        quant_format=ortq.QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=ortq.QuantType.QInt8,
                        weight_type=ortq.QuantType.QInt8,
                        reduce_range=reduce,
                    )
        except ConfigError:
            raise
        except Exception as exc:
            raise ArtifactError(
                f"ONNX Runtime could not quantize {source}: {first_line(exc)}: "
                "try the other mode or per_channel=False"
            ) from exc
        data = _with_metadata(onnx, source, out.read_bytes())
    atomic_write_bytes(target, data)
    return target


def _has_branches(onnx: Any, source: Path) -> bool:
    """Whether a node of the file's top graph holds graphs of its own (an ``If``)."""
    graph = onnx.load(str(source), load_external_data=False).graph
    return any(a.type == a.GRAPH for node in graph.node for a in node.attribute)


def _with_metadata(onnx: Any, source: Path, data: bytes) -> bytes:
    """``data`` with the metadata of the ``source`` file it was quantized from (what a runner
    reads there, such as a decoder's block size) where the quantizer dropped it."""
    original = onnx.load(str(source), load_external_data=False).metadata_props
    model = onnx.load_from_string(data)
    present = {p.key for p in model.metadata_props}
    missing = [p for p in original if p.key not in present]
    if not missing:
        return data
    for prop in missing:
        entry = model.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    return model.SerializeToString()
