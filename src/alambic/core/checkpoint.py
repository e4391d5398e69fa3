"""Checkpoints that survive a kill at any moment, and that load without unpickling anything.

A training checkpoint is a directory ``ckpt-EPOCH/`` with:

- ``model.safetensors``: the trainable module (student + connectors; never the teacher);
- ``optimizer.safetensors`` + ``state.json``: optimizer tensors, and everything else (optimizer
  hyper-parameters, scheduler state, epoch, step, Python / NumPy RNG states) as JSON;
- ``rng-RANK.safetensors``: each process's torch RNG state (and its GPU's, when it has one);
- ``checksums.json``: the SHA-256 of every other file, verified before a resume reads them, so that bytes
  changed after the checkpoint was written (a failing disk, a copy cut short, an edit) stop the resume
  in one line instead of training on from them. Checkpoints written before it existed resume unverified.

It is written into a temporary directory, every file fsynced, then renamed into place; ``latest.json``
is then replaced atomically to point at it, and only then are older checkpoints removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alambic.errors import AlambicError, ConfigError, first_line
from alambic.files import atomic_write_text, dumps_json, fsync_dir, writing
from alambic.models import load_weights

LATEST = "latest.json"
CHECKSUMS = "checksums.json"


def _state_dict_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: store plain contiguous copies.
    return {key: value.detach().contiguous().clone() for key, value in module.state_dict().items()}


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a module's weights as safetensors, atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(_state_dict_for_save(module), temporary, metadata=metadata)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:  # the previous file stays intact, no half-written one is left
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def load_weights_file(module: nn.Module, path: str | Path, *, fix: str) -> None:
    """Load safetensors weights saved by :func:`save_weights` (strict).

    A damaged file, or one whose tensors do not fit ``module`` (the first mismatching tensor is named),
    raises one line ending with ``fix``, what the user should do.
    """
    try:
        report = load_weights(module, path, strict=False)
    except ConfigError as error:
        raise AlambicError(f"{error}; {fix}") from None
    problems = [
        *report["mismatched"],
        *(f"{key} is missing from the file" for key in report["missing"]),
        *(f"{key} is not in the model" for key in report["unexpected"]),
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AlambicError(
            f"{path} does not fit the {type(module).__name__}: {problems[0]}{more}; "
            f"it was written for another model config; {fix}"
        )


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        plain_state[str(param_id)] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().clone()
            else:
                plain_state[str(param_id)][key] = value
    return tensors, {"state": plain_state, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def _restore_python_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``latest.json`` points to, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
        if not isinstance(name, str) or Path(name).name != name:
            raise ValueError(name)
    except (ValueError, KeyError, TypeError):  # json.JSONDecodeError is a ValueError
        raise AlambicError(
            f"{pointer} is damaged (not the JSON alambic writes); delete {directory} to train this "
            "stage again from its start with --resume"
        ) from None
    path = Path(directory) / name
    if not path.is_dir():
        raise AlambicError(
            f"{pointer} points to {path.name}, which is missing; the run directory was edited by hand"
        )
    return path


def save_training_state(
    directory: str | Path,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    step: int,
    process_index: int = 0,
    barrier: Any = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/ckpt-EPOCH`` atomically; every process writes its own RNG state.

    ``extra`` (JSON values) and ``extra_tensors`` are the loop's own state (callbacks, a stop), read
    back by :func:`load_extra`. ``barrier`` (e.g. ``accelerator.wait_for_everyone``) is called between the phases when several
    processes take part; with one process it may be None.
    """
    directory = Path(directory)
    final = directory / f"ckpt-{epoch:04d}"
    staging = directory / f".ckpt-{epoch:04d}.tmp"
    barrier = barrier or (lambda: None)
    try:
        if process_index == 0:
            with writing(staging):
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
        barrier()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # dropout on a GPU draws from the device's generator, not the CPU's
            rng["cuda"] = torch.cuda.get_rng_state()
        with writing(staging):
            save_file(rng, staging / f"rng-{process_index}.safetensors")
        barrier()
        if process_index == 0:
            if extra_tensors:
                with writing(staging):
                    save_file(extra_tensors, staging / "extra.safetensors")
            _write_staged(directory, staging, final, module, optimizer, scheduler, epoch, step, extra)
    except BaseException:  # a full disk, SIGTERM: the previous checkpoint stays, no half-written one is left
        shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    return final


def _write_staged(
    directory: Path, staging: Path, final: Path, module, optimizer, scheduler, epoch: int, step: int, extra
) -> None:
    with writing(staging):
        save_file(_state_dict_for_save(module), staging / "model.safetensors")
        optimizer_tensors, optimizer_plain = _flatten_optimizer(optimizer.state_dict())
        save_file(optimizer_tensors, staging / "optimizer.safetensors")
        state = {
            "epoch": epoch,
            "step": step,
            "optimizer": optimizer_plain,
            "scheduler": scheduler.state_dict(),
            "rng": _python_rng_state(),
            "extra": extra or {},
        }
        (staging / "state.json").write_text(dumps_json(state))
        (staging / CHECKSUMS).write_text(dumps_json(file_checksums(staging)))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        fsync_dir(directory)
        atomic_write_text(
            directory / LATEST, dumps_json({"checkpoint": final.name, "epoch": epoch, "step": step})
        )
    for old in directory.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(
    path: str | Path,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_index: int = 0,
) -> tuple[int, int]:
    """Restore what :func:`save_training_state` wrote; returns ``(epoch, step)`` of the checkpoint.

    A damaged or incomplete checkpoint, or one that does not fit ``module``, raises one line naming the
    file (the run directory is left as it is).
    """
    path = Path(path)
    fix = f"delete {path.parent} to train this stage again from its start with --resume"
    verify_checksums(path, fix)
    load_weights_file(module, path / "model.safetensors", fix=fix)
    try:
        state = json.loads(_checkpoint_file(path, "state.json", fix).read_text())
        epoch, step = int(state["epoch"]), int(state["step"])
        optimizer_tensors = _read_tensors(_checkpoint_file(path, "optimizer.safetensors", fix), fix)
        optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        _restore_python_rng(state["rng"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        reason = first_line(error)
        raise AlambicError(
            f"{path}/state.json or optimizer.safetensors is damaged ({reason}); {fix}"
        ) from None
    rng_file = path / f"rng-{process_index}.safetensors"
    if not rng_file.is_file():
        rng_file = path / "rng-0.safetensors"  # resumed with more processes than saved it
    rng = _read_tensors(_checkpoint_file(path, rng_file.name, fix), fix)
    if "torch" not in rng:
        raise AlambicError(f"{rng_file} holds no torch RNG state; {fix}")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return epoch, step


def load_extra(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``extra`` values and tensors a checkpoint was saved with (empty for older checkpoints)."""
    path = Path(path)
    fix = f"delete {path.parent} to train this stage again from its start with --resume"
    try:
        extra = json.loads(_checkpoint_file(path, "state.json", fix).read_text()).get("extra", {})
    except ValueError as error:
        raise AlambicError(f"{path}/state.json is damaged ({first_line(error)}); {fix}") from None
    tensors = _read_tensors(path / "extra.safetensors", fix) if (path / "extra.safetensors").is_file() else {}
    return extra, tensors


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_checksums(directory: Path) -> dict[str, Any]:
    """``{"algorithm": "sha256", "files": {name: hex}}`` over the files of a staged checkpoint."""
    files = sorted(file for file in directory.iterdir() if file.is_file() and file.name != CHECKSUMS)
    return {"algorithm": "sha256", "files": {file.name: file_sha256(file) for file in files}}


def verify_checksums(path: Path, fix: str) -> None:
    """Check every file ``checksums.json`` lists in checkpoint ``path``; one line naming the first that differs.

    A checkpoint without ``checksums.json`` (written by an older alambic) is not verified.
    """
    listing = path / CHECKSUMS
    if not listing.is_file():
        return
    try:
        files = json.loads(listing.read_text())["files"]
        expected = {str(name): str(digest) for name, digest in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise AlambicError(f"{listing} is damaged ({first_line(error)}); {fix}") from None
    for name, digest in expected.items():
        if Path(name).name != name:
            raise AlambicError(f"{listing} names {name!r}, which is not a file of the checkpoint; {fix}")
        if file_sha256(_checkpoint_file(path, name, fix)) != digest:
            raise AlambicError(
                f"checkpoint file {path / name} does not match the checksum written with it (its bytes "
                f"changed after it was saved: a failing disk, a cut copy or an edit); {fix}"
            )


def _checkpoint_file(path: Path, name: str, fix: str) -> Path:
    if not (path / name).is_file():
        raise AlambicError(f"checkpoint {path} has no {name}: it is incomplete; {fix}")
    return path / name


def _read_tensors(file: Path, fix: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise AlambicError(f"cannot read {file} ({error}): the checkpoint is damaged; {fix}") from None
