"""Atomic file writes: write a temp file beside the target, then rename over it.

A reader never sees a half-written file, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and check a file can be written there.

    Raises:
        OutputError: if the folder cannot be created or written.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".secateur-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write to {folder}: {reason}: choose a writable --out folder"
        ) from None
    return folder


def current_umask() -> int:
    """The process's file-creation mask (os.umask can only be read by setting it: it is set
    back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + ``os.replace``).

    Raises:
        OutputError: if the folder cannot be written; no temp file is left behind.
    """
    target = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.fchmod(
            fd, 0o666 & ~current_umask()
        )  # mkstemp makes 0600; a saved artifact should not be
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write {target}: {reason}: choose a writable --out folder"
        ) from None


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
