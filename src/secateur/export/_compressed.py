"""The compressed model file: sparse index + quantized values + entropy coding, no pickle.

Deep Compression's pipeline (Han et al. 2016), as a file format. Each Linear/Conv/Embedding
weight (and each stacked expert weight of a mixture-of-experts layer) with zeros is stored as the positions of its non-zeros (a bitmask or relative gap codes,
whichever is smaller; see ``_codec``) plus their values, encoded as:

* ``exact``: the tensor's own dtype, bit for bit (lossless);
* ``float16``: half precision;
* ``int8``: symmetric linear codes with one float32 scale per output row (for an expert
  stack, per stored row of each expert's matrix: an output unit, or an input feature when the
  stack is kept ``(in, out)``; the header's ``rows`` says how many);
* ``codebook``: ``bits``-bit codes into a per-layer table of at most ``2**bits`` float32 values.
  A layer with that few distinct non-zeros (e.g. after ``quantization.cluster_weights_`` and
  centroid fine-tuning) is stored exactly; otherwise it is clustered by k-means here.

Every other tensor (biases, norms, buffers) is stored exactly. The payload is then compressed
with zstd (``entropy="none"`` skips it, to measure each stage's share).

File layout, all integers little-endian::

    b"SECZ" | u32 version (1) | u64 header length | 32-byte SHA-256 of the header | header | payload

The header is UTF-8 JSON: the model manifest (zoo spec, edits, tied names, metadata) and, per
tensor, its dtype, shape, layout, non-zero count and byte segments; the payload's SHA-256 and
sizes. Loading checks both hashes before decoding anything, decompresses no more than the
declared size, and validates every length against the shapes, so a truncated, corrupt or
hostile file raises ``ArtifactError`` and never runs code: nothing is unpickled or evaluated.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import nn

from .._atomic import atomic_write_bytes
from .._config import check_int, check_range, coerce_enum, config_from_dict, config_to_dict
from .._experts import expert_stacks
from ..errors import ArtifactError, ConfigError
from ..pruning._unstructured import is_weight_layer
from ..quantization._codebook import CodebookConfig
from ._codec import best_relative_bits, encode_bitmask, pack_bits, relative_codes
from ._safetensors import LoadedModel, model_edits, rebuild_model, tensors_to_save
from ._tensor_codec import MAX_ELEMENTS, decode_tensor, encode_values, tensor_bytes

MAGIC = b"SECZ"
VERSION = 1
FORMAT = "secateur.compressed/1"
SUFFIX = ".secz"
_PREFIX = struct.Struct("<4sIQ32s")
MAX_HEADER_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = 1 << 36
_FIX = "pass a file written by secateur export --format compressed"


class ValueCoding(str, enum.Enum):
    EXACT = "exact"
    FLOAT16 = "float16"
    INT8 = "int8"
    CODEBOOK = "codebook"


class IndexCoding(str, enum.Enum):
    AUTO = "auto"
    BITMASK = "bitmask"
    RELATIVE = "relative"


class Entropy(str, enum.Enum):
    ZSTD = "zstd"
    NONE = "none"


@dataclass(frozen=True)
class CompressionConfig:
    """How :func:`save_compressed` encodes weights.

    Attributes:
        values: ``exact`` (lossless), ``float16``, ``int8`` or ``codebook``.
        bits: codebook code width in [1, 8] (Deep Compression: 5 for FC, 8 for conv layers).
        per_layer: fnmatch pattern on module names → codebook bits, first match wins.
        index: ``auto`` picks the smaller of ``bitmask`` and ``relative`` per tensor.
        entropy: ``zstd`` compresses the payload; ``none`` leaves it raw.
        level: zstd level in [1, 22].
    """

    values: ValueCoding = ValueCoding.CODEBOOK
    bits: int = 5
    per_layer: dict[str, int] = field(default_factory=dict)
    index: IndexCoding = IndexCoding.AUTO
    entropy: Entropy = Entropy.ZSTD
    level: int = 19

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", coerce_enum("values", ValueCoding, self.values))
        object.__setattr__(self, "index", coerce_enum("index", IndexCoding, self.index))
        object.__setattr__(self, "entropy", coerce_enum("entropy", Entropy, self.entropy))
        CodebookConfig(bits=self.bits, per_layer=self.per_layer)  # validates bits
        check_int("level", self.level, 1)
        check_range("level", self.level, 1, 22)

    @property
    def label(self) -> str:
        """``exact``, ``float16``, ``int8`` or ``codebook 5-bit`` (with any per-layer widths,
        e.g. ``codebook 5-bit, fc3=8``): the value coding in words."""
        values = self.values.value
        if values != "codebook":
            return values
        layers = "".join(f", {pattern}={bits}" for pattern, bits in self.per_layer.items())
        return f"codebook {self.bits}-bit{layers}"

    def bits_for(self, module_name: str) -> int:
        return CodebookConfig(bits=self.bits, per_layer=self.per_layer).bits_for(module_name)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        return config_from_dict(cls, data)


def _weight_names(model: nn.Module) -> dict[str, str]:
    """state-dict name of each shareable weight → its module's name: Embedding, Linear, Conv
    and Conv1D weights, and stacked expert weights."""
    out = {}
    for module_name, module in model.named_modules():
        if (isinstance(module, nn.Embedding) or is_weight_layer(module)) and isinstance(
            module.weight, torch.Tensor
        ):
            out[f"{module_name}.weight" if module_name else "weight"] = module_name
    for param_name, (module_name, _) in expert_stacks(model).items():
        out[param_name] = module_name
    return out


class _Payload:
    """Segments gathered in streams of like data (index codes, value codes, floats), because
    an entropy coder models each stream's statistics better alone than mixed. Segment offsets
    point into the concatenation of the streams, in ``STREAMS`` order."""

    STREAMS = ("index", "codes", "floats")

    def __init__(self, aligned: bool) -> None:
        self.aligned = aligned  # codes one per byte, for the entropy coder to model
        self.streams: dict[str, list[bytes]] = {s: [] for s in self.STREAMS}
        self.sizes = dict.fromkeys(self.STREAMS, 0)
        self.segments: list[tuple[str, list[int]]] = []

    def add(self, data: bytes, stream: str = "floats") -> list[int]:
        segment = [self.sizes[stream], len(data)]
        self.streams[stream].append(data)
        self.sizes[stream] += len(data)
        self.segments.append((stream, segment))
        return segment

    def codes(self, codes: np.ndarray, bits: int, stream: str) -> tuple[list[int], int]:
        """Add ``bits``-bit codes, bit-packed or one per byte; return (segment, width)."""
        width = 8 if self.aligned else bits
        return self.add(pack_bits(codes, width), stream), width

    def finish(self) -> list[bytes]:
        """The raw bytes of each stream; every segment's offset becomes global."""
        base, start = {}, 0
        for name in self.STREAMS:
            base[name] = start
            start += self.sizes[name]
        for stream, segment in self.segments:
            segment[0] += base[stream]
        return [b"".join(self.streams[name]) for name in self.STREAMS]


def _index_entry(
    nonzero: np.ndarray, positions: np.ndarray, choice: IndexCoding, payload: _Payload
) -> dict[str, Any]:
    # one code per byte when aligned anyway: then the widest gaps need the fewest fillers
    bits = 8 if payload.aligned else best_relative_bits(positions)[0]
    codes = relative_codes(positions, bits)
    relative_bytes = (codes.size * bits + 7) // 8
    use_relative = choice is IndexCoding.RELATIVE or (
        choice is IndexCoding.AUTO and relative_bytes < (nonzero.size + 7) // 8
    )
    if use_relative:
        segment, width = payload.codes(codes, bits, "index")
        return {
            "code": "relative",
            "bits": bits,
            "width": width,
            "count": codes.size,
            "segment": segment,
        }
    return {"code": "bitmask", "segment": payload.add(encode_bitmask(nonzero), "index")}


def _encode(model: nn.Module, config: CompressionConfig, metadata: dict[str, Any]) -> bytes:
    spec = getattr(model, "secateur_spec", None)
    if spec is None:
        raise ConfigError("model has no secateur_spec: build it with secateur.zoo.create_model")
    tensors, tied = tensors_to_save(model)
    weights = _weight_names(model)
    stacks = expert_stacks(model)
    payload = _Payload(aligned=config.entropy is Entropy.ZSTD)
    entries = []
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": name, "dtype": str(t.dtype).removeprefix("torch.")}
        entry["shape"] = list(t.shape)
        shared = name in weights and t.is_floating_point() and t.dim() >= 2
        if not shared:
            entry["layout"] = "dense"
            segment = payload.add(tensor_bytes(t))
            entry["values"] = {"code": "exact", "segments": {"data": segment}}
            entries.append(entry)
            continue
        flat = t.reshape(-1)
        nonzero = (flat != 0).numpy()
        nnz = int(nonzero.sum())
        entry["nnz"] = nnz
        if nnz < flat.numel():
            entry["layout"] = "sparse"
            found = np.flatnonzero(nonzero)
            entry["index"] = _index_entry(nonzero, found, config.index, payload)
            positions = torch.from_numpy(found)
        else:
            entry["layout"] = "dense"
            positions = torch.arange(flat.numel())
        bits = config.bits_for(weights[name])
        rows = t.shape[0] * t.shape[1] if name in stacks else None  # a scale per expert row
        entry["values"] = encode_values(t, positions, config.values.value, bits, payload, rows)
        entries.append(entry)
    raws = payload.finish()
    if config.entropy is Entropy.ZSTD:
        coder = zstandard.ZstdCompressor(level=config.level)
        frames = [coder.compress(raw) for raw in raws]
    else:
        frames = [b"".join(raws)]
        raws = frames
    stored = b"".join(frames)
    header = {
        "format": FORMAT,
        "model": spec,
        "edits": model_edits(model),
        "tied": tied,
        "metadata": metadata,
        "compression": config.to_dict(),
        "tensors": entries,
        "payload": {
            "entropy": config.entropy.value,
            "bytes": len(stored),
            "raw_bytes": sum(len(raw) for raw in raws),
            "frames": [[len(f), len(r)] for f, r in zip(frames, raws, strict=True)],
            "sha256": hashlib.sha256(stored).hexdigest(),
        },
    }
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata is not JSON-serialisable ({exc}): pass plain values") from None
    prefix = _PREFIX.pack(MAGIC, VERSION, len(text), hashlib.sha256(text).digest())
    return prefix + text + stored


def compressed_bytes(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The exact bytes :func:`save_compressed` would write; nothing touches the disk."""
    return _encode(model, config or CompressionConfig(), metadata or {})


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    config: CompressionConfig | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (built by ``zoo.create_model``) as one compressed file; return its path.

    Raises:
        ConfigError: the path does not end in ``.secz``, the model has no ``secateur_spec``, or
            metadata is not JSON-serialisable; nothing is written then.
        OutputError: the folder cannot be written (the write is atomic: temp file + rename).

    Example:
        >>> import tempfile
        >>> from secateur import UnstructuredConfig, create_model, prune_
        >>> net = create_model("lenet_300_100")
        >>> _ = prune_(net, UnstructuredConfig(sparsity=0.9))
        >>> path = save_compressed(net, tempfile.mkdtemp() + "/net.secz")
        >>> path.stat().st_size < 0.1 * 4 * sum(p.numel() for p in net.parameters())
        True
    """
    target = Path(path)
    if target.suffix != SUFFIX:
        raise ConfigError(
            f"cannot save to {target}: a compressed model's path must end in {SUFFIX}"
        )
    blob = compressed_bytes(model, config, metadata=metadata)
    atomic_write_bytes(target, blob)
    return target


def _fail(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"compressed model {path} is {why}: {_FIX}")


def _read_header(blob: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    if len(blob) < _PREFIX.size:
        raise _fail(path, "truncated (shorter than its fixed prefix)")
    magic, version, header_len, header_hash = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise _fail(path, "not a secateur compressed file (bad magic bytes)")
    if version != VERSION:
        raise _fail(path, f"format version {version}, which this secateur cannot read")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(blob):
        raise _fail(path, "truncated or corrupt (header length exceeds the file)")
    text = blob[_PREFIX.size : _PREFIX.size + header_len]
    if hashlib.sha256(text).digest() != header_hash:
        raise _fail(path, "corrupt (header SHA-256 mismatch)")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError covers JSONDecodeError
        raise _fail(path, "corrupt (header is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, f"not a {FORMAT} file")
    return header, blob[_PREFIX.size + header_len :]


def _payload(header: dict[str, Any], stored: bytes, path: Path) -> bytes:
    info = header.get("payload")
    if not isinstance(info, dict):
        raise _fail(path, "corrupt (no payload description)")
    size, raw_size = info.get("bytes"), info.get("raw_bytes")
    if not all(isinstance(v, int) and 0 <= v <= MAX_PAYLOAD_BYTES for v in (size, raw_size)):
        raise _fail(path, "corrupt (payload sizes out of range)")
    if len(stored) != size:
        raise _fail(path, f"truncated or padded (payload has {len(stored)} bytes, header {size})")
    if hashlib.sha256(stored).hexdigest() != info.get("sha256"):
        raise _fail(path, "corrupt (payload SHA-256 mismatch)")
    frames = info.get("frames")
    ok = isinstance(frames, list) and all(
        isinstance(f, list) and len(f) == 2 and all(type(v) is int and v >= 0 for v in f)
        for f in frames
    )
    if not ok or sum(f[0] for f in frames) != size or sum(f[1] for f in frames) != raw_size:
        raise _fail(path, "corrupt (frame table does not add up to the payload size)")
    if info.get("entropy") == Entropy.NONE.value:
        raw = stored
    elif info.get("entropy") == Entropy.ZSTD.value:
        parts, start = [], 0
        decoder = zstandard.ZstdDecompressor()
        for stored_len, raw_len in frames:
            frame = stored[start : start + stored_len]
            start += stored_len
            try:
                # zstandard allocates what a frame declares, whatever max_output_size says
                if raw_len and zstandard.frame_content_size(frame) != raw_len:
                    raise _fail(path, "corrupt (a zstd frame declares the wrong size)")
                part = decoder.decompress(frame, max_output_size=raw_len) if raw_len else b""
            except zstandard.ZstdError as exc:
                raise _fail(path, f"corrupt (zstd: {exc})") from None
            if len(part) != raw_len:
                raise _fail(path, "corrupt (a zstd frame decompresses to the wrong size)")
            parts.append(part)
        raw = b"".join(parts)
    else:
        raise _fail(path, f"encoded with an unknown entropy coder {info.get('entropy')!r}")
    if len(raw) != raw_size:
        raise _fail(path, "corrupt (decompressed payload has the wrong size)")
    return raw


def read_compressed_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON header of a compressed file (model spec, metadata, tensor layout)."""
    source = Path(path)
    return _read_header(_read(source), source)[0]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _declared_elements(entry: Any) -> int:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
        return math.prod(shape)
    return 0  # malformed: decode_tensor reports it


def load_compressed(path: str | os.PathLike[str], *, device: str = "cpu") -> LoadedModel:
    """Rebuild the model stored at ``path`` by :func:`save_compressed`, in eval mode.

    Lossless encodings (``exact`` values, every index code, zstd) restore tensors bit for bit;
    lossy ones restore the quantized values the file holds.

    Raises:
        ArtifactError: one line, for a missing, truncated, corrupt or foreign file.
    """
    source = Path(path)
    header, stored = _read_header(_read(source), source)
    raw = _payload(header, stored, source)
    spec, entries = header.get("model"), header.get("tensors")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        raise _fail(source, "missing its model spec")
    if not isinstance(entries, list):
        raise _fail(source, "missing its tensor table")
    tensors: dict[str, torch.Tensor] = {}
    declared = sum(_declared_elements(e) for e in entries)
    if declared > MAX_ELEMENTS:
        raise _fail(source, f"declaring {declared:,} elements, over the {MAX_ELEMENTS:,} limit")
    for entry in entries:
        try:
            name, tensor = decode_tensor(entry, raw)
        except (ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError) as exc:
            raise _fail(source, f"corrupt ({exc})") from None
        tensors[name] = tensor
    for key in ("edits", "tied"):
        if not isinstance(header.get(key, {}), dict):
            raise _fail(source, f"corrupt ('{key}' is not a mapping)")
    model = rebuild_model(header, tensors, source)
    model.to(device).eval()
    metadata = header.get("metadata")
    return LoadedModel(model, metadata if isinstance(metadata, dict) else {}, source, source)
