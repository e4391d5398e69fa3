"""What the loop records: ``metrics.jsonl`` (and TensorBoard) lines, and the non-finite watch over every
step's losses (:class:`FiniteGuard`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alambic.core.checkpoint import (
    atomic_write_text,
)
from alambic.errors import NonFiniteLossError
from alambic.files import dumps_json, writing


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main process only) and, optionally, to TensorBoard."""

    def __init__(
        self, path: str | Path | None, *, enabled: bool = True, tensorboard_dir: str | Path | None = None
    ):
        self.path = Path(path) if path and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # distill(run_dir="runs/new") creates it
        self.writer = None
        if tensorboard_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: alambic[tensorboard]

            self.writer = SummaryWriter(str(tensorboard_dir))

    def drop_after(self, stage: str, step: int) -> None:
        """Forget ``stage``'s records past ``step`` (a resumed run logs those steps again)."""
        if self.path is None or not self.path.is_file():
            return

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if not (record.get("stage") == stage and record.get("step", 0) > step):
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with writing(self.path), open(self.path, "a") as handle:
                handle.write(dumps_json(record) + "\n")
        if self.writer is not None:
            scalars = record.get("losses", {}) | {
                k: v for k, v in record.items() if k in ("accuracy", "lr", "macro_f1", "loss", "perplexity")
            }
            for key, value in scalars.items():
                self.writer.add_scalar(f"{record['stage']}/{record['kind']}/{key}", value, record["step"])
            self.writer.flush()


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
