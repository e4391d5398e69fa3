"""Run directories: a new one needs a free folder; a resumed one must keep its started stages' settings
(:mod:`alambic.run.resume`); ``status.json`` says how the run stands."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from alambic.config import RunConfig, dump_config, load_config
from alambic.core.checkpoint import atomic_write_text
from alambic.core.lock import is_lock_file
from alambic.errors import AlambicError, ConfigError
from alambic.files import dumps_json, writing
from alambic.run.resume import check_resumable


def write_status(run_dir: Path, accelerator: Accelerator, **fields: Any) -> None:
    if accelerator.is_main_process:
        record = {"updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
        atomic_write_text(run_dir / "status.json", dumps_json(record, indent=2))


def check_run_dir_state(config: RunConfig, run_dir: Path, *, resume: bool) -> list[str]:
    """Before anything is written: a new run needs a free directory; a resumed one, a run directory whose
    started stages keep their settings under ``config`` (see :mod:`alambic.run.resume`). Returns the changes a
    resume makes to the stored config (empty for a new run or the same config)."""
    stored = run_dir / "config.yaml"
    if resume:
        if not stored.is_file():
            raise ConfigError(
                f"--resume {run_dir}: no config.yaml there; is it a run directory written by alambic?"
            )
        if stored.read_text() == dump_config(config):
            return []
        previous = read_stored_config(stored)
        return check_resumable(run_dir, previous, config.model_dump(mode="json"))
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a folder; give --out a new folder's path")
    if run_dir.exists() and any(not is_lock_file(path) for path in run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists; continue it with --resume {run_dir}, "
            "or pick another name (--set name=...) or --out"
        )
    return []


def read_stored_config(path: Path) -> dict:
    """A run directory's ``config.yaml`` as a resolved dict (validated, so older files gain new defaults)."""
    try:
        return load_config(path).model_dump(mode="json")
    except ConfigError as error:
        raise ConfigError(
            f"{path} cannot be read back ({error}); it was not written by this version"
        ) from None


def prepare_run_dir(
    config: RunConfig, run_dir: Path, *, resume: bool, is_main: bool, barrier: Any = None
) -> None:
    """Create the run directory, or check that a resumed one can continue under ``config``.

    A resume with a corrected config (see :mod:`alambic.run.resume`) keeps the previous one beside it as
    ``config.before-<UTC time>.yaml`` and stores the new one as ``config.yaml``.
    """
    changes = check_run_dir_state(config, run_dir, resume=resume)
    if barrier is not None:
        barrier()  # every process has checked before the main one writes
    if not is_main:
        return
    stored = run_dir / "config.yaml"
    if resume:
        if changes:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            atomic_write_text(run_dir / f"config.before-{stamp}.yaml", stored.read_text())
            atomic_write_text(stored, dump_config(config))
        return
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, dump_config(config))


def run_directory(config: RunConfig, run_dir: str | Path | None = None) -> Path:
    """The run directory: ``run_dir`` when given, else ``output_dir/name``."""
    return Path(run_dir) if run_dir else Path(config.output_dir) / config.name


def check_run_dir(run_dir: str | Path) -> Path:
    """A run directory written by alambic, or a one-line error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise AlambicError(
            f"{run_dir} is not an alambic run directory (no config.yaml); pass the folder `alambic run` wrote"
        )
    return run_dir
