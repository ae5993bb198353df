"""Lossless building blocks of the compressed format: bit packing and sparse index codes.

Everything here maps numpy arrays to ``bytes`` and back, little-endian, with no framing: the
container (``_compressed.py``) records every length. Decoders validate what they read and raise
``ValueError`` on any inconsistency, so a corrupt file can never yield a silently wrong tensor.

Two index codes locate the non-zeros of a flattened tensor of ``numel`` entries:

* **bitmask**: one bit per entry (``numel / 8`` bytes), good at moderate sparsity;
* **relative** (Deep Compression, Han et al. 2016): the gap from the previous non-zero (the first
  counted from position -1) in ``bits`` bits. Gaps are >= 1, so code 0 is free; it means "advance
  ``2**bits - 1`` positions, no value here", which bridges longer gaps without storing the filler
  zeros that the paper spends a value slot on. Good at high sparsity.
"""

from __future__ import annotations

import numpy as np

INDEX_BITS = (2, 3, 4, 5, 6, 7, 8)


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ``codes`` (each < ``2**bits``, 1 <= bits <= 8) into a little-endian bitstream."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, 1)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    planes = np.unpackbits(codes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits as ``uint8``."""
    if len(data) != (count * bits + 7) // 8:
        raise ValueError(f"{len(data)} bytes cannot hold exactly {count} codes of {bits} bits")
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    planes = planes[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.astype(np.uint16) @ weights).astype(np.uint8)


def encode_bitmask(mask: np.ndarray) -> bytes:
    return np.packbits(mask.reshape(-1).astype(bool), bitorder="little").tobytes()


def decode_bitmask(data: bytes, numel: int, nnz: int) -> np.ndarray:
    """Flat positions of the set bits; checks the length and that exactly ``nnz`` are set."""
    if len(data) != (numel + 7) // 8:
        raise ValueError(f"bitmask of {len(data)} bytes does not cover {numel} entries")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[numel:].any():
        raise ValueError("bitmask has bits set past the end of the tensor")
    positions = np.flatnonzero(bits[:numel])
    if positions.size != nnz:
        raise ValueError(f"bitmask marks {positions.size} non-zeros, the header says {nnz}")
    return positions


def relative_codes(positions: np.ndarray, bits: int) -> np.ndarray:
    """Gap codes for sorted flat ``positions`` (see the module docstring)."""
    span = (1 << bits) - 1
    gaps = np.diff(positions.astype(np.int64), prepend=-1)
    fillers = (gaps - 1) // span  # whole spans to skip before the gap fits in 1..span
    rest = gaps - fillers * span
    out = np.zeros(int(fillers.sum()) + gaps.size, dtype=np.uint8)
    ends = np.cumsum(fillers + 1) - 1  # where each real gap lands; fillers before it stay 0
    out[ends] = rest
    return out


def decode_relative(
    data: bytes, bits: int, count: int, numel: int, nnz: int, width: int | None = None
) -> np.ndarray:
    """Flat positions from ``count`` gap codes stored ``width`` bits apiece (default ``bits``);
    checks that every code fits ``bits`` and that the positions stay inside the tensor."""
    codes = unpack_bits(data, width or bits, count).astype(np.int64)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"an index code does not fit in {bits} bits")
    steps = np.where(codes == 0, (1 << bits) - 1, codes)
    ends = np.cumsum(steps) - 1
    positions = ends[codes != 0]
    if positions.size != nnz:
        raise ValueError(f"index codes give {positions.size} non-zeros, the header says {nnz}")
    if positions.size and positions[-1] >= numel:
        raise ValueError(f"index codes point past the end of a tensor of {numel} entries")
    return positions


def best_relative_bits(positions: np.ndarray) -> tuple[int, int]:
    """(bits, code count) of the smallest relative code for ``positions``."""
    gaps = np.diff(positions.astype(np.int64), prepend=-1)
    best = None
    for bits in INDEX_BITS:
        count = int(((gaps - 1) // ((1 << bits) - 1)).sum()) + gaps.size
        size = count * bits
        if best is None or size < best[0]:
            best = (size, bits, count)
    assert best is not None
    return best[1], best[2]
