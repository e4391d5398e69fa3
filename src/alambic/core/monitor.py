"""What the loop records: ``metrics.jsonl`` lines and the experiment trackers' runs (:class:`Trackers`,
through Accelerate's tracking API), and the non-finite watch over every step's losses (:class:`FiniteGuard`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers

from alambic.config.tracking import TrackingConfig
from alambic.core.checkpoint import (
    atomic_write_text,
)
from alambic.errors import ConfigError, NonFiniteLossError
from alambic.files import dumps_json, writing

PIP_NAMES = {"mlflow": "mlflow-skinny", "tensorboard": "tensorboard"}  # else the tracker's own name


def check_trackers_installed(names: list[str]) -> None:
    """A one-line error naming what to ``pip install`` for the first tracker whose package is missing
    (Accelerate would silently log nothing to it)."""
    available = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        package = PIP_NAMES.get(missing[0], missing[0])
        raise ConfigError(
            f"tracking with {missing[0]} needs the {package} package, which is not installed: pip install {package}"
        )


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker scalars: ``train/<term>``, ``train/lr``, ``eval/<metric>``, ``epoch``."""
    kind = record["kind"]
    values = {f"{kind}/{name}": value for name, value in record.get("losses", {}).items()}
    for name, value in record.items():
        if name not in ("stage", "kind", "step", "losses") and isinstance(value, int | float):
            values["epoch" if name == "epoch" else f"{kind}/{name}"] = value
    return values


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"distill.train.lr": 0.05, ...}``: what every tracker stores as hyper-parameters (lists as JSON text)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            plain = isinstance(value, bool | int | float | str)
            flat[f"{prefix}{key}"] = value if plain else json.dumps(value)
    return flat


class Trackers:
    """Experiment-tracker runs through Accelerate (``init_trackers``, ``log``): one per training stage.

    The accelerator must have been built with ``log_with`` (:func:`~alambic.core.optim.make_accelerator`).
    Each stage's run is named ``run_name/stage`` and grouped by ``run_name`` (W&B ``group``, MLflow tags);
    TensorBoard writes under ``logging_dir/stage``, W&B under ``logging_dir/stage/wandb``. Accelerate
    logs from the main process only.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        tracking: TrackingConfig,
        *,
        project: str,
        run_name: str,
        logging_dir: str | Path,
        config: dict[str, Any] | None = None,
    ):
        self.accelerator, self.tracking, self.project, self.run_name = (
            accelerator,
            tracking,
            project,
            run_name,
        )
        self.logging_dir, self.config = Path(logging_dir), flat_config(config or {})
        self.stage: str | None = None

    def log(self, record: dict[str, Any]) -> None:
        """Log a ``metrics.jsonl`` record to its stage's tracker run (started at the stage's first record)."""
        if record["stage"] != self.stage:
            self.finish()
            self.start(record["stage"])
        self.accelerator.log(tracker_values(record), step=record["step"])

    def start(self, stage: str) -> None:
        directory = self.logging_dir / stage
        directory.mkdir(parents=True, exist_ok=True)
        # Accelerate hands its logging_dir to the trackers that write files (TensorBoard: DIR/project)
        self.accelerator.project_configuration.logging_dir = str(directory)
        name = f"{self.run_name}/{stage}"
        ours = {
            "wandb": {"name": name, "group": self.run_name, "job_type": stage, "dir": str(directory)},
            "mlflow": {"run_name": name, "tags": {"alambic.run": self.run_name, "alambic.stage": stage}},
        }
        init_kwargs = {
            tracker: ours.get(tracker, {}) | self.tracking.init_kwargs.get(tracker, {})
            for tracker in self.tracking.trackers
        }
        self.accelerator.init_trackers(self.project, config=self.config, init_kwargs=init_kwargs)
        self.stage = stage

    def finish(self) -> None:
        """End the stage's tracker runs. Not ``Accelerator.end_training``: it also destroys the process
        group, which the next stage (and the evaluation after training) still uses."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self.stage = None


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and logs them to the experiment trackers (main process only).

    Close it (``with MetricsLog(...) as log:``) to end the last stage's tracker runs.
    """

    def __init__(self, path: str | Path | None, *, enabled: bool = True, trackers: Trackers | None = None):
        self.path = Path(path) if path and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # distill(run_dir="runs/new") creates it
        self.trackers = trackers if enabled else None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.finish()

    def drop_after(self, stage: str, step: int | None) -> None:
        """Forget ``stage``'s records past ``step``, or all of them when ``step`` is None.

        A stage resumed from its checkpoint at ``step`` logs the later steps again; a stage that starts
        from scratch (an attempt killed before its first checkpoint) logs all of its steps again.
        """
        if self.path is None or not self.path.is_file():
            return
        lines, kept = self.path.read_text().splitlines(), []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            later = step is None or record.get("step", 0) > step
            if not (record.get("stage") == stage and later):
                kept.append(line + "\n")
        if len(kept) < len(lines):  # nothing to forget (a stage's first start): the file is left alone
            atomic_write_text(self.path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with writing(self.path), open(self.path, "a") as handle:
                handle.write(dumps_json(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)


class FiniteGuard:
    """Records every micro-batch's losses on the device, one kernel a step; :meth:`check` reads them.

    ``watch`` writes the step's terms into a row of a device buffer (no host-device sync, no other
    work per step). ``check`` (at log steps and at the end of every epoch, before weights are evaluated
    or checkpointed) reads the rows since the last check in one transfer: it raises if a total was
    non-finite, naming the first such micro-batch's step and terms, and otherwise returns the terms'
    means over those rows, which the loop logs. Steps taken after a bad one are wasted but never
    saved: the last good checkpoint stays the one to resume from.
    """

    def __init__(self, accelerator: Accelerator, stage: str, capacity: int = 64):
        self.accelerator, self.stage, self.capacity = accelerator, stage, capacity
        self.rows: torch.Tensor | None = None  # [capacity, terms]
        self.names: list[str] = []
        self.steps: list[int] = []  # the optimizer step of each row (kept on the host: no sync)
        self.count = 0  # rows written since the last check
        self.plain = True  # every loss a float32 scalar (set from the first step's losses)

    def watch(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """Record this micro-batch's weighted terms and total; ``step`` is the optimizer step it belongs to."""
        if self.rows is None:
            self.names = list(losses)
            self.rows = torch.empty(self.capacity, len(losses), device=losses["total"].device)
            # float32 scalars (the usual case) are stacked as they are; others are converted first
            self.plain = all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())
        elif self.count == len(self.rows):  # more micro-batches between checks than expected
            self.rows = torch.cat([self.rows, torch.empty_like(self.rows)])
        values = [
            value.detach() if self.plain else value.detach().float().reshape(()) for value in losses.values()
        ]
        torch.stack(values, out=self.rows[self.count])
        self.steps.append(step)
        self.count += 1

    def check(self, epoch: int) -> dict[str, float]:
        """Raise :class:`NonFiniteLossError` for a non-finite total; else the terms' means since the last check."""
        if not self.count:
            return {}
        rows = self.rows[: self.count]
        total = rows[:, self.names.index("total")]
        bad_here = (~torch.isfinite(total)).any().float().reshape(1)
        bad_anywhere = bad_here
        if self.accelerator.num_processes > 1:  # all processes stop together, or DDP would hang
            bad_anywhere = self.accelerator.reduce(bad_here, reduction="max")
        summary = torch.cat([bad_here, bad_anywhere, rows.mean(0)]).tolist()  # one transfer
        if summary[1] > 0:
            if summary[0] > 0:
                first = int((~torch.isfinite(total)).nonzero()[0])
                values = dict(zip(self.names, rows[first].tolist()))
                where, terms = f"step {self.steps[first]}", f" (terms: {values})"
            else:
                where, terms = "a step", " in another process"
            raise NonFiniteLossError(
                f"{self.stage}: the loss became non-finite at epoch {epoch}, {where}{terms}; lower the lr, "
                "add grad_clip, or check the inputs. The last good checkpoint is kept"
            )
        self.steps, self.count = [], 0
        return dict(zip(self.names, summary[2:]))
