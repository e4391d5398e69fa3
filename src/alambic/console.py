"""What the command line shows: the live progress bar of a run's stages and the table of its models."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from alambic.run.compress_report import export_checks, latency_sizes, number_cell
from alambic.run.seeds import format_mean

console = Console()


class ProgressBar:
    """A Rich progress bar per training stage, fed by the loop's ``progress`` callback."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[values]}"),
            console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, step: int, total: int, values: dict) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, values="")
        shown = " ".join(f"{key} {value:.4g}" for key, value in values.items())
        self.progress.update(self.tasks[stage], completed=step, values=shown)

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


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
    console.print(table)
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
    console.print(table)


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
    console.print(table)
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
    console.print(files)
