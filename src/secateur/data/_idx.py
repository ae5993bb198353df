"""Reading and writing the IDX format of (Fashion-)MNIST.

IDX layout: two zero bytes, an element-type byte (0x08 = uint8), a byte giving the number of
dimensions, that many big-endian uint32 sizes, then the elements in C order. Files may be
gzip-compressed; compression is detected from the content, never from the file name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError

_GZIP_MAGIC = b"\x1f\x8b"
_UINT8 = 0x08
_TYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_FIX = (
    "reinstall the Debian package dataset-fashion-mnist or pass --data DIR holding intact IDX files"
)


def _corrupt(path: Path, why: str) -> DatasetError:
    return DatasetError(f"{path} is corrupt ({why}): {_FIX}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of uint8 elements, plain or gzip-compressed.

    Args:
        path: the file. Gzip compression is recognised by its magic bytes (1f 8b).

    Returns:
        A writable C-contiguous ``uint8`` array whose shape is the one stored in the header,
        e.g. ``(60000, 28, 28)`` for an ``idx3`` image file or ``(60000,)`` for labels.

    Raises:
        DatasetError: the file cannot be read, is truncated or too long, has a bad header or a
            bad gzip stream, or holds elements other than uint8.

    Example:
        >>> images = read_idx(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))
        >>> images.shape, images.dtype
        ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DatasetError(
            f"cannot read {path} ({reason}): check the path and its permissions "
            "or pass --data DIR holding readable IDX files"
        ) from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            detail = " ".join(str(exc).split())
            raise _corrupt(
                path, f"bad gzip stream: {detail}" if detail else "bad gzip stream"
            ) from None
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than an IDX header")
    if raw[0] != 0 or raw[1] != 0:
        raise _corrupt(path, f"bad magic bytes {raw[:4].hex()}, expected 0000 then type and ndim")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _UINT8:
        kind = _TYPE_NAMES.get(dtype_code)
        if kind is None:
            raise _corrupt(path, f"unknown IDX element type 0x{dtype_code:02x}")
        raise DatasetError(
            f"{path} holds {kind} elements (IDX type 0x{dtype_code:02x}) but only uint8 (0x08) "
            "is supported: convert it to uint8 IDX or pass --data DIR holding uint8 IDX files"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _corrupt(path, f"header truncated: {len(raw)} bytes, {ndim} dimensions need more")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise _corrupt(
            path, f"{what}: header shape {shape} needs {expected} data bytes, found {actual}"
        )
    # frombuffer over immutable bytes is read-only; one copy makes the array writable so that
    # callers (and torch.from_numpy) can use it without warnings.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write a uint8 array as an IDX file, optionally gzip-compressed.

    Args:
        path: the file to create or overwrite. The name is not changed: add ``.gz`` yourself
            when ``compress`` is true if you want the usual naming.
        array: a ``uint8`` array with 1 to 255 dimensions, each smaller than 2**32.
        compress: gzip the file (deterministically: the gzip timestamp is zero).

    Raises:
        ConfigError: ``array`` is not uint8 or its shape cannot be stored in IDX.
        DatasetError: the file cannot be written.

    Example:
        >>> write_idx(Path("labels-idx1-ubyte.gz"), np.array([3, 1, 4], np.uint8), compress=True)
        >>> read_idx(Path("labels-idx1-ubyte.gz")).tolist()
        [3, 1, 4]
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ConfigError(
            f"write_idx needs a uint8 array, got {array.dtype}: convert it with "
            "array.astype(numpy.uint8) after scaling values into 0..255"
        )
    if not 1 <= array.ndim <= 255:
        raise ConfigError(
            f"write_idx needs an array with 1 to 255 dimensions, got {array.ndim}: "
            "reshape it, e.g. a scalar to shape (1,)"
        )
    if any(d >= 2**32 for d in array.shape):
        raise ConfigError(
            f"write_idx cannot store shape {array.shape}: every dimension must be below 2**32; "
            "split the array into several files"
        )
    header = bytes([0, 0, _UINT8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)
    try:
        path.write_bytes(payload)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DatasetError(
            f"cannot write {path} ({reason}): choose a writable folder for the IDX file"
        ) from None
