"""What the command line shows: the progress of a run's stages and evaluations (a live bar on a terminal;
elsewhere plain, flushed lines: one every ``log_every`` steps, one per epoch, a few per evaluation) and
the tables of its models."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from alambic.run.compress_report import export_checks, latency_sizes, number_cell
from alambic.run.numbers import format_mean

console = Console()


def print_table(table: Table) -> None:
    """A table on the console; written to a file or a pipe (nohup, SLURM, CI), at its full width, where
    Rich would cut it at 80 columns ("98.…")."""
    if console.is_terminal or console.is_jupyter:
        console.print(table)
    else:
        Console(width=100_000, file=console.file).print(table)


def shown_values(values: dict) -> str:
    return " ".join(f"{key} {value:.4g}" for key, value in values.items())


def clock_time(seconds: float | None) -> str:
    """``H:MM:SS``, or ``?`` when not known yet."""
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


RATES = ("tokens_per_s", "samples_per_s")  # what the loop trains per second, shown as "N tokens/s"


def with_rates(values: dict) -> str:
    """Losses and metrics as :func:`shown_values`, then the training rate as ``N tokens/s``."""
    rates = [f"{value:,.0f} {key.removesuffix('_per_s')}/s" for key, value in values.items() if key in RATES]
    return " ".join(
        part for part in [shown_values({k: v for k, v in values.items() if k not in RATES}), *rates] if part
    )


class ProgressBar:
    """The loop's ``progress`` callback ``(stage, step, total_steps, values)``: on a terminal (or in Jupyter),
    a live Rich bar per stage with its elapsed time and ETA; otherwise :class:`EpochLines`."""

    def __init__(self) -> None:
        self.live = console.is_terminal or console.is_jupyter
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[values]}"),
            console=console,
        )
        self.lines = LogLines()
        self.tasks: dict[str, Any] = {}
        self.shown: dict[str, dict] = {}  # per stage: the last train values and test metrics

    def __call__(self, stage: str, step: int, total: int, values: dict) -> None:
        if not self.live:
            self.lines(stage, step, total, values)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, values="")
        shown = self.shown.setdefault(stage, {})
        if any(key.startswith("test_") for key in values):
            shown.update(values)
        else:  # train values replace the previous ones; the last test metric stays in view
            self.shown[stage] = shown = values | {k: v for k, v in shown.items() if k.startswith("test_")}
        self.progress.update(self.tasks[stage], completed=step, values=with_rates(shown))

    def evaluation(self, label: str, done: int, total: int | None, unit: str) -> None:
        """An evaluation's progress: ``done`` of ``total`` windows or samples (called at 0, then after each
        batch); on a terminal its own bar, removed when it ends."""
        if not self.live:
            self.lines.evaluation(label, done, total, unit)
            return
        key = f"eval:{label}"
        if key not in self.tasks:
            description = label if label.startswith("evaluate") else f"{label} eval"
            self.tasks[key] = self.progress.add_task(description, total=total, values=unit)
        self.progress.update(self.tasks[key], completed=done)
        if total is not None and done >= total:
            self.progress.remove_task(self.tasks.pop(key))

    def __enter__(self) -> ProgressBar:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.progress.stop()
        else:
            self.lines.finish()


@dataclass
class StageClock:
    """One stage as :class:`EpochLines` follows it: its pace and the epoch not yet printed."""

    stage: str
    total: int  # optimizer steps
    started: float  # monotonic time of the stage's first report
    first_step: int
    step: int = 0
    epoch: int | None = None
    steps_per_epoch: float | None = None  # known after an evaluation (which ends an epoch)
    losses: dict = field(default_factory=dict)
    tests: dict = field(default_factory=dict)
    printed: bool = True  # the current epoch's line is written

    def line(self, now: float) -> str:
        elapsed = now - self.started
        done = self.step - self.first_step
        eta = (self.total - self.step) * elapsed / done if done > 0 else None
        epochs = round(self.total / self.steps_per_epoch) if self.steps_per_epoch else None
        epoch = "" if self.epoch is None else f"epoch {self.epoch}" + (f"/{epochs}" if epochs else "") + "  "
        return (
            f"{self.stage:<9} {epoch}step {self.step}/{self.total}  {shown_values(self.losses | self.tests)}  "
            f"elapsed {timedelta(seconds=round(elapsed))}  ETA {'?' if eta is None else timedelta(seconds=round(eta))}"
        )


class EpochLines:
    """Progress where no live bar can be drawn (nohup, SLURM, CI logs): one plain, flushed line per epoch
    (stage, epoch / epochs, step, train losses, test metric, elapsed time and ETA), written when its
    evaluation is in, else at the next epoch's first report. Elapsed time counts from the stage's first
    report (``log_every`` steps in), the ETA from the pace since. The first process only."""

    def __init__(self) -> None:
        self.clocks: dict[str, StageClock] = {}
        self.current: StageClock | None = None
        self.enabled = int(os.environ.get("RANK", "0")) == 0

    def __call__(self, stage: str, step: int, total: int, values: dict) -> None:
        now = time.monotonic()
        values = dict(values)
        epoch = values.pop("epoch", None)
        clock = self.clocks.setdefault(stage, StageClock(stage, total, now, step))
        if self.current is not None and (self.current is not clock or (epoch or 0) > (clock.epoch or 0)):
            self.write(self.current, now)
        self.current, clock.step, clock.epoch = clock, step, epoch
        tests = {key: value for key, value in values.items() if key.startswith("test_")}
        if tests:  # an evaluation ends its epoch: the line is complete
            clock.tests, clock.printed = tests, False
            if epoch:
                clock.steps_per_epoch = step / epoch
            self.write(clock, now)
        else:
            if clock.printed:  # a new epoch
                clock.tests = {}
            clock.losses, clock.printed = values, False

    def write(self, clock: StageClock, now: float) -> None:
        if not clock.printed and self.enabled:
            console.print(clock.line(now), highlight=False, markup=False, soft_wrap=True)
            console.file.flush()
        clock.printed = True

    def finish(self) -> None:
        if self.current is not None:
            self.write(self.current, time.monotonic())


class LogLines(EpochLines):
    """:class:`EpochLines`, and where no bar is drawn a flushed line at every report of the loop (every
    ``log_every`` optimizer steps: stage, step / steps, epoch, losses, tokens or samples a second, elapsed
    time and ETA) and during an evaluation (windows or samples done of their total, elapsed, ETA; at its
    start, at each tenth and at its end), so that ``tail -f`` of a log file follows a run."""

    EVALUATION_LINES = 10  # lines per evaluation besides its first

    def __init__(self) -> None:
        super().__init__()
        self.evaluations: dict[str, tuple[float, int]] = {}  # label: (started, tenths written)

    def __call__(self, stage: str, step: int, total: int, values: dict) -> None:
        super().__call__(stage, step, total, {key: v for key, v in values.items() if key not in RATES})
        if not any(key.startswith("test_") for key in values):
            self.say(self.step_line(self.clocks[stage], values, time.monotonic()))

    def step_line(self, clock: StageClock, values: dict, now: float) -> str:
        elapsed, done = now - clock.started, clock.step - clock.first_step
        eta = (clock.total - clock.step) * elapsed / done if done > 0 else None
        losses = {key: value for key, value in values.items() if key not in ("epoch", *RATES)}
        rates = with_rates({key: value for key, value in values.items() if key in RATES})
        epoch = f"  epoch {values['epoch']}" if "epoch" in values else ""
        return (
            f"{clock.stage:<9} step {clock.step}/{clock.total}{epoch}  {shown_values(losses)}  "
            f"{rates}  elapsed {clock_time(elapsed)}  ETA {clock_time(eta)}"
        )

    def evaluation(self, label: str, done: int, total: int | None, unit: str) -> None:
        now = time.monotonic()
        if done == 0 or label not in self.evaluations:
            self.evaluations[label] = (now, -1)
        started, written = self.evaluations[label]
        tenth = self.EVALUATION_LINES * done // total if total else 0
        if tenth <= written and done != total:
            return
        self.evaluations[label] = (started, tenth)
        elapsed = now - started
        eta = (total - done) * elapsed / done if total and done else None
        of = f"/{total}" if total else ""
        self.say(
            f"{label:<9} evaluating {done}{of} {unit}  elapsed {clock_time(elapsed)}  ETA {clock_time(eta)}"
        )

    def say(self, line: str) -> None:
        if self.enabled:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
            console.file.flush()


def print_summary(summary: dict) -> None:
    """The models side by side: accuracy, F1 (a language model: perplexity, next-token accuracy, KL to the
    teacher, tokens/s), size, FLOPs, latency."""
    table = Table(title=f"{summary.get('run_name', '')} on {summary.get('dataset', '')} (test split)")
    batch_sizes = sorted(
        {size for m in summary["models"].values() for size in m.get("latency_ms", {})}, key=int
    )
    language = summary.get("task") == "causal-lm"
    quality = ("ppl", "next-token %", "KL(T||S)", "tok/s") if language else ("acc %", "F1", "AUC")
    columns = ("model", *quality, "params", "KB", "MFLOPs", *(f"ms@{size}" for size in batch_sizes))
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for name, m in summary["models"].items():
        latency = m.get("latency_ms", {})
        table.add_row(
            name,
            *(
                language_cells(m)
                if language
                else (
                    number_cell(m.get("accuracy"), ".2f", 100),
                    number_cell(m.get("macro_f1"), ".4f"),
                    number_cell(m.get("roc_auc"), ".4f"),
                )
            ),
            f"{m['parameters']:,}",
            f"{m['size_bytes'] / 1024:.1f}",
            f"{m['flops'] / 1e6:.3g}",
            *(f"{latency.get(size, float('nan')):.3g}" for size in batch_sizes),
        )
    print_table(table)
    if summary.get("seeds"):
        print_seed_statistics(summary["seeds"], language)


def print_seed_statistics(seeds: dict, language: bool) -> None:
    """Mean ± standard deviation (and n) of the baseline and distilled students over their seeds."""
    metrics = (
        (("perplexity", "ppl", 1.0, ".3f"), ("next_token_accuracy", "next-token %", 100.0, ".2f"))
        if language
        else (("accuracy", "acc %", 100.0, ".2f"), ("macro_f1", "F1", 1.0, ".4f"))
    )
    table = Table(title=f"mean ± standard deviation over seeds {seeds['seeds']}")
    for column in ("model", "n", *(title for _, title, _, _ in metrics)):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for name, stats in seeds["models"].items():
        count = next(iter(stats.values()), {}).get("n", 0)
        table.add_row(
            name, str(count), *(format_mean(stats.get(key), spec, scale) for key, _, scale, spec in metrics)
        )
    console.print(table)


def language_cells(m: dict) -> tuple[str, ...]:
    speed = m.get("generation") or {}
    return (
        number_cell(m.get("perplexity"), ".3f"),
        number_cell(m.get("next_token_accuracy"), ".2f", 100),
        number_cell(m.get("kl_to_teacher"), ".4f"),
        number_cell(speed.get("tokens_per_s"), ".0f"),
    )


def print_tune_trials(study: Any, result: dict) -> None:
    """A study's trials: state, validation accuracy, method and settings."""
    table = Table(title=f"alambic tune: {study}")
    for column in ("trial", "state", "val acc %", "method", "T", "ce", "w", "lr", "student / note"):
        table.add_column(
            column, justify="left" if column in ("state", "method", "student / note") else "right"
        )
    for record in result["trials"]:
        params, value = record["params"], record["value"]
        note = record.get("over_budget") or json.dumps((record.get("student") or {}).get("kwargs", {}))
        table.add_row(
            str(record["number"]),
            record["state"].lower(),
            "" if value is None else f"{100 * value:.2f}",
            str(params.get("method", "")),
            *(
                f"{params[key]:.3g}" if key in params else ""
                for key in ("temperature", "ce_weight", "distill_weight", "lr")
            ),
            note,
        )
    print_table(table)


def print_compress_summary(summary: dict) -> None:
    """The compression stages side by side (accuracy, size, FLOPs, PyTorch and onnxruntime latency at the
    run's batch sizes), then every exported file with its parity to the model it came from."""
    rows = summary["models"]
    sizes = latency_sizes(rows)
    table = Table(
        title=f"{summary['run_name']}: compression stages ({summary['evaluated_samples']:,} test samples)"
    )
    columns = ("model", "acc %", "params", "KB", "MFLOPs")
    columns += (*(f"torch ms@{size}" for size in sizes), *(f"ORT ms@{size}" for size in sizes))
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for name, row in rows.items():
        table.add_row(
            name,
            f"{100 * row['accuracy']:.2f}",
            f"{row['parameters']:,}",
            f"{row['size_bytes'] / 1024:.1f}",
            f"{row['flops'] / 1e6:.3g}",
            *(number_cell(row["latency_ms"].get(size), ".3g") for size in sizes),
            *(number_cell(row["onnxruntime_latency_ms"].get(size), ".3g") for size in sizes),
        )
    print_table(table)
    checks = export_checks(summary)
    if not checks:
        return
    files = Table(title="exported files, each checked against the model it came from")
    for column in ("file", "row", "KB", "max |diff|", "agree %", "checked against"):
        files.add_column(column, justify="right" if column in ("KB", "max |diff|", "agree %") else "left")
    for check in checks:
        files.add_row(
            check["path"],
            check["model"],
            f"{check['size_bytes'] / 1024:.1f}",
            f"{check['max_abs_diff']:.2e}",
            number_cell(check["prediction_agreement"], ".2f", 100),
            check["against"],
        )
    print_table(files)
