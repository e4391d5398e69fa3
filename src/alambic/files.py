"""What alambic writes: strict JSON (no bare NaN), atomic files, and one line for an operating-system fault.

``json.dumps`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader accepts; every
JSON file alambic writes goes through :func:`dumps_json`, which stores non-finite numbers as ``null``
and passes ``allow_nan=False`` so a missed one fails loudly instead of writing invalid JSON.
:func:`atomic_write_text` writes a file all or nothing (a temporary file, fsynced, then renamed); it lives
here, at the bottom layer, so data writers can use it as well as checkpoints and run directories.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alambic.errors import OutputError

_HINTS = {
    errno.ENOSPC: "free some disk space or pick another --out",
    errno.EDQUOT: "free some of your disk quota or pick another --out",
    errno.EACCES: "make the folder writable or pick another --out",
    errno.EPERM: "make the folder writable or pick another --out",
    errno.EROFS: "the file system is read-only; pick another --out",
    errno.ENOTDIR: "part of the path is a file, not a folder; pick another --out",
    errno.EEXIST: "a file of that name is in the way; remove it or pick another --out",
    errno.EISDIR: "a folder of that name is in the way; remove it or pick another --out",
}


def finite_json(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` with every non-finite float replaced by None, and the dotted paths of those floats.

    Example:
        >>> finite_json({"models": {"a": {"accuracy": float("nan")}}})
        ({'models': {'a': {'accuracy': None}}}, ['models.a.accuracy'])
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where]
    if isinstance(value, dict):
        pairs = [
            (key, finite_json(item, f"{where}.{key}" if where else str(key))) for key, item in value.items()
        ]
        return {key: item for key, (item, _) in pairs}, [path for _, (_, paths) in pairs for path in paths]
    if isinstance(value, (list, tuple)):
        items = [
            finite_json(item, f"{where}.{index}" if where else str(index)) for index, item in enumerate(value)
        ]
        return [item for item, _ in items], [path for _, paths in items for path in paths]
    return value, []


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with non-finite numbers written as ``null``; always valid JSON."""
    return json.dumps(finite_json(value)[0], allow_nan=False, **kwargs)


def os_error_message(path: str | Path, error: OSError) -> str:
    """One line naming the path the OS refused and why, with what to do."""
    where = error.filename or path
    reason = error.strerror or str(error) or type(error).__name__
    hint = _HINTS.get(error.errno, "check the path and the disk, or pick another --out")
    return f"cannot write {where}: {reason}; {hint}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OSError as error:
        raise OutputError(os_error_message(path, error)) from error


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            try:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:  # no half-written temporary file left behind; the old file stays
                handle.close()
                os.unlink(handle.name)
                raise
        try:
            os.replace(handle.name, path)
        except BaseException:  # a signal or an error between the write and the rename
            Path(handle.name).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())
