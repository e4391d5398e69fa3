"""One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock`` held while a run writes.

The operating system drops an ``flock`` when its process ends, however it ends (``kill -9`` included),
so a lock left by a dead process never blocks the next run. The file records who holds it
(process id, host, start time) for the message a second writer gets. Under ``accelerate launch`` the
processes of one run share its lock: the main process takes it and tells the others whether it got it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alambic.errors import AlambicError
from alambic.files import writing

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # lock path -> pid of the process holding it here (a forked child holds nothing)


class RunLockedError(AlambicError):
    """Another process is writing the same run directory."""


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is a run directory's lock file (which alone does not make a directory a run)."""
    return path.name == LOCK_NAME


@contextlib.contextmanager
def run_lock(run_dir: str | Path, accelerator: Any = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block, creating the directory; refuse a second writer.

    Raises :class:`RunLockedError` when another process holds it. Re-entrant within one process
    (``compress`` from a config runs the pipeline inside its own lock). With an ``accelerator`` of
    several processes only the main one locks; the others raise the same error when it could not.
    On leaving, the lock file is removed, and so is the directory when it is left empty.
    """
    path = Path(run_dir).resolve() / LOCK_NAME
    main = accelerator is None or accelerator.is_main_process
    if _held.get(path) == os.getpid() or not main:
        _follow_main(accelerator, None)
        yield
        return
    created = not path.parent.exists()
    try:
        handle = _acquire(path, shown=Path(run_dir))
    except AlambicError as error:  # locked, or the folder cannot be written: every process stops with it
        _follow_main(accelerator, error)
        raise
    _follow_main(accelerator, None)
    _held[path] = os.getpid()
    try:
        yield
    finally:
        del _held[path]
        path.unlink(
            missing_ok=True
        )  # before the unlock: a waiting opener then sees a stale inode and retries
        handle.close()  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only if nothing was written (a run refused before it started)


def _acquire(path: Path, shown: Path):
    """Open and flock ``path``; retry when the file was replaced between the open and the lock."""
    while True:
        with writing(shown):  # a full disk, a read-only folder, a path under a file: one line
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                handle = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
            except FileNotFoundError:  # the directory was removed by a holder leaving it empty
                continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"run directory {shown} is in use by {holder}; wait for it to finish, or stop it "
                "(a stopped run continues with --resume)"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # we locked a file its holder had just removed: lock the one now at the path
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    handle.truncate(0)
    handle.write(f"process {os.getpid()} on {socket.gethostname()} since {stamp}")
    handle.flush()
    return handle


def _follow_main(accelerator: Any, error: AlambicError | None) -> None:
    """Under several processes: every process learns whether the main one got the lock, and stops with
    the same one-line error when it did not."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    sent = (isinstance(error, RunLockedError), str(error)) if error is not None else None
    received = broadcast_object_list([sent])[0]
    if received is not None and not accelerator.is_main_process:
        locked, message = received
        raise (RunLockedError if locked else AlambicError)(message)
