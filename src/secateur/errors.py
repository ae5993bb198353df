"""User-facing errors.

Every error a user can cause by bad input derives from :class:`SecateurError`. Its message is one
line that names the problem and the fix; the CLI prints it and exits with status 2, no traceback.
"""

from __future__ import annotations


class SecateurError(Exception):
    """Base class of all errors caused by bad user input."""


class ConfigError(SecateurError, ValueError):
    """A configuration value is out of range or of the wrong kind; the message names the field."""


class DatasetError(SecateurError):
    """Data files are missing, unreadable or corrupt."""


class ArtifactError(SecateurError):
    """A saved model or checkpoint is missing, unreadable, corrupt or not a secateur artifact."""


class OutputError(SecateurError):
    """An output location cannot be written."""


class PruningError(SecateurError):
    """Pruning could not be applied safely to this model; the model was left unchanged."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name if it has none), to quote a library's
    error inside a one-line secateur error."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
