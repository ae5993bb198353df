"""Encode one tensor's values into byte segments, and decode a tensor entry of the header.

The container (``_compressed.py``) owns the file; this module owns what one tensor entry means.
Decoding trusts nothing: every field is type-checked, every segment must lie inside the payload
and have exactly the length its shape, count and code width imply, and codes must index
existing table entries. Violations raise ``ValueError`` for the container to report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..quantization._codebook import kmeans_1d
from ._codec import decode_bitmask, decode_relative, unpack_bits

DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
}
MAX_ELEMENTS = 1 << 31  # per file; a hostile header cannot make the loader allocate more


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU tensor, in its own dtype."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _from_bytes(data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    if len(data) != count * size:
        raise ValueError(f"segment of {len(data)} bytes does not hold {count} {dtype} values")
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).clone()


def encode_values(
    t: torch.Tensor,
    positions: torch.Tensor,
    coding: str,
    bits: int,
    payload: Any,
    rows: int | None = None,
) -> dict[str, Any]:
    """Encode ``t.reshape(-1)[positions]`` as ``coding`` into ``payload`` (the container's
    segment store); return the entry's ``values`` header fields. ``int8`` keeps one scale per
    row, ``t`` seen as ``rows`` equal rows (default its first dimension; a stacked expert
    weight passes ``experts × dim 1``, recorded in the header)."""
    values = t.reshape(-1)[positions]
    if coding != "exact" and not bool(torch.isfinite(values).all()):
        raise ConfigError(
            "a weight holds NaN or inf, which lossy value codes cannot represent: fix the model "
            "or save with values='exact'"
        )
    if coding == "exact":
        return {"code": "exact", "segments": {"data": payload.add(tensor_bytes(values))}}
    if coding == "float16":
        data = payload.add(tensor_bytes(values.to(torch.float16)))
        return {"code": "float16", "segments": {"data": data}}
    if coding == "int8":
        fields: dict[str, Any] = {} if rows is None else {"rows": rows}
        rows = t.shape[0] if rows is None else rows
        row_of = positions // max(1, t.numel() // max(1, rows))
        peak = torch.zeros(rows).scatter_reduce_(
            0, row_of, values.abs().float(), "amax", include_self=True
        )
        scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
        codes = torch.round(values.float() / scales[row_of]).clamp(-127, 127).to(torch.int8)
        segments = {
            "scales": payload.add(tensor_bytes(scales)),
            "data": payload.add(tensor_bytes(codes), "codes"),
        }
        return {"code": "int8", "segments": segments, **fields}
    if coding == "codebook":
        centroids, codes = kmeans_1d(values, 1 << bits)
        table = payload.add(tensor_bytes(centroids))
        data, width = payload.codes(codes.numpy().astype(np.uint8), bits, "codes")
        return {
            "code": "codebook",
            "bits": bits,
            "width": width,
            "clusters": int(centroids.numel()),
            "segments": {"centroids": table, "data": data},
        }
    raise ValueError(f"unknown value coding {coding!r}")


def _int(entry: dict[str, Any], key: str, low: int = 0, high: int = MAX_ELEMENTS) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"field '{key}'={value!r} is not an integer in [{low}, {high}]")
    return value


def _segment(segments: Any, key: str, raw: bytes) -> bytes:
    if not isinstance(segments, dict):
        raise ValueError("segments must be a mapping")
    seg = segments.get(key)
    ok = isinstance(seg, list) and len(seg) == 2 and all(type(v) is int and v >= 0 for v in seg)
    if not ok or seg[0] + seg[1] > len(raw):
        raise ValueError(f"segment '{key}'={seg!r} lies outside the payload")
    return raw[seg[0] : seg[0] + seg[1]]


def _positions(entry: dict[str, Any], numel: int, nnz: int, raw: bytes) -> np.ndarray:
    index = entry.get("index")
    if not isinstance(index, dict):
        raise ValueError("a sparse tensor needs an index")
    data = _segment(index, "segment", raw)
    if index.get("code") == "bitmask":
        return decode_bitmask(data, numel, nnz)
    if index.get("code") == "relative":
        bits = _int(index, "bits", 1, 8)
        width = _int(index, "width", bits, 8)
        count = _int(index, "count", 0, 8 * len(raw))
        return decode_relative(data, bits, count, numel, nnz, width)
    raise ValueError(f"unknown index code {index.get('code')!r}")


def _values(
    fields: dict[str, Any], raw: bytes, dtype: torch.dtype, shape: list[int], pos: np.ndarray | None
) -> torch.Tensor:
    """The stored values, one per position (``pos=None``: every entry of a dense tensor)."""
    segments = fields.get("segments")
    code = fields.get("code")
    count = math.prod(shape) if pos is None else pos.size
    data = _segment(segments, "data", raw)
    if code == "exact":
        return _from_bytes(data, dtype, count)
    if code == "float16":
        return _from_bytes(data, torch.float16, count).to(dtype)
    if code == "int8":
        rows = _int(fields, "rows", 1) if "rows" in fields else shape[0]
        if math.prod(shape) % max(1, rows):
            raise ValueError(f"int8 rows={rows} do not divide a tensor of shape {shape}")
        scales = _from_bytes(_segment(segments, "scales", raw), torch.float32, rows)
        codes = _from_bytes(data, torch.int8, count).float()
        flat = torch.arange(count) if pos is None else torch.from_numpy(pos)
        row_of = flat // max(1, math.prod(shape) // max(1, rows))
        return (codes * scales[row_of]).to(dtype)
    if code == "codebook":
        bits = _int(fields, "bits", 1, 8)
        width = _int(fields, "width", bits, 8)
        clusters = _int(fields, "clusters", 0, 1 << bits)
        table = _from_bytes(_segment(segments, "centroids", raw), torch.float32, clusters)
        codes = torch.from_numpy(unpack_bits(data, width, count).astype(np.int64))
        if codes.numel() and int(codes.max()) >= clusters:
            raise ValueError(f"a code points past the {clusters}-entry codebook")
        return table[codes].to(dtype)
    raise ValueError(f"unknown value code {code!r}")


def decode_tensor(entry: Any, raw: bytes) -> tuple[str, torch.Tensor]:
    """Decode one header entry against the raw payload; return ``(name, tensor)``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError("a tensor entry lacks its name")
    name = entry["name"]
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise ValueError(f"tensor {name} has an unsupported dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name} has a malformed shape {shape!r}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise ValueError(f"tensor {name} declares {numel} elements, over the {MAX_ELEMENTS} limit")
    fields = entry.get("values")
    if not isinstance(fields, dict):
        raise ValueError(f"tensor {name} lacks its values")
    layout = entry.get("layout")
    if layout == "dense":
        positions = None  # every entry; segment lengths are checked before anything is allocated
    elif layout == "sparse":
        nnz = _int(entry, "nnz", 0, numel)
        positions = _positions(entry, numel, nnz, raw)
    else:
        raise ValueError(f"tensor {name} has an unknown layout {layout!r}")
    if fields.get("code") != "exact" and (not dtype.is_floating_point or len(shape) < 1):
        raise ValueError(f"tensor {name}: lossy codes apply to float weights only")
    values = _values(fields, raw, dtype, shape, positions)
    if layout == "dense":
        return name, values.reshape(shape)
    out = torch.zeros(numel, dtype=dtype)
    out[torch.from_numpy(positions)] = values
    return name, out.reshape(shape)
