"""User-facing errors.

Anything the user can fix (a bad config key, a missing data file, a temperature <= 0) raises
:class:`AlambicError`; the CLI prints its one-line message with exit code 2 and no traceback
unless ``--debug`` is given. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class AlambicError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(AlambicError):
    """A configuration value is missing, unknown or of the wrong type."""


class DataError(AlambicError):
    """A data file is missing or malformed."""


class NonFiniteLossError(AlambicError):
    """A loss became NaN or infinite during training."""


class OutputError(AlambicError):
    """The operating system refused a write: a full disk, a read-only folder, a path through a file."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
