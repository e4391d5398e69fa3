"""Write ``report.md`` and its plots from a finished run directory.

Reads ``summary.json`` (models, stage times, distillation terms) and ``metrics.jsonl`` (one
training or evaluation record per line) and writes ``report.md`` plus ``plots/*.png``. A leaf:
matplotlib is imported inside the functions, and nothing in the training path imports this module.

Units in the report: accuracy in percent, sizes in MB (10^6 bytes), FLOPs in MFLOPs (10^6, one
multiply-accumulate = 2 FLOPs, per sample), latency in milliseconds per batch.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from alambic.core.lock import run_lock
from alambic.errors import AlambicError
from alambic.files import writing
from alambic.run.numbers import MISSING, format_mean, format_number, format_significant, is_number
from alambic.run.plots import (
    make_plot,
    plot_accuracy_curves,
    plot_accuracy_vs_latency,
    plot_accuracy_vs_size,
    plot_training_curves,
)
from alambic.run.report_lm import language_model_lines, sample_lines

# The command that writes summary.json, named in the error raised when it is missing.
SUMMARY_COMMAND = "alambic run CONFIG.yaml"
# Models shown first, in this order; any other model key follows in the order of summary.json.
PREFERRED_MODEL_ORDER = ("teacher", "baseline", "distilled")


def _load_summary(run_dir: Path) -> dict[str, Any]:
    """Read ``summary.json``, raising :class:`AlambicError` when it is missing or not JSON."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise AlambicError(
            f"run directory {run_dir} has no summary.json; it is written at the end of a run by "
            f"`{SUMMARY_COMMAND}`. Point to a finished run directory or run training first"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AlambicError(f"{path} is not valid JSON ({error}); re-run training to rewrite it") from error


def _load_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Read ``metrics.jsonl``; return the records and how many malformed lines were skipped.

    A run killed mid-write can leave a truncated last line, so bad lines are skipped, not fatal.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _ordered_models(models: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Models as (name, record): teacher, baseline, distilled first, then the others as given."""
    names = [name for name in PREFERRED_MODEL_ORDER if name in models]
    names += [name for name in models if name not in PREFERRED_MODEL_ORDER]
    return [(name, models[name]) for name in names]


def _latency_batch_sizes(models: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Every batch size any model was timed at, as strings, in increasing numeric order."""
    sizes = {str(key) for _, model in models for key in (model.get("latency_ms") or {})}
    return sorted(sizes, key=lambda size: (not size.isdigit(), int(size) if size.isdigit() else 0, size))


def _models_table(models: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown table: one row per model with accuracy, F1, ROC AUC (when measured), errors, size, FLOPs and
    latency."""
    batch_sizes = _latency_batch_sizes(models)
    auc = any("roc_auc" in model for _, model in models)
    header = ["Model", "Architecture", "Accuracy (%)", "Macro-F1", *(["ROC AUC"] if auc else []), "Errors"]
    header += ["Params", "Size (MB)", "MFLOPs"]
    header += [f"Latency b{size} (ms)" for size in batch_sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, model in models:
        latency = model.get("latency_ms") or {}
        errors = model.get("errors")
        if is_number(errors) and is_number(model.get("num_samples")):
            errors = f"{errors} / {model['num_samples']}"
        else:
            errors = format_number(errors, "d")
        cells = [
            name,
            str(model.get("architecture", MISSING)),
            format_number(model.get("accuracy"), ".2f", 100.0),
            format_number(model.get("macro_f1"), ".4f"),
            *([format_number(model.get("roc_auc"), ".4f")] if auc else []),
            errors,
            format_number(model.get("parameters"), ",d"),
            format_significant(model.get("size_bytes"), 1e-6),
            format_significant(model.get("flops"), 1e-6),
        ]
        cells += [format_significant(latency.get(size)) for size in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seeds_table(seeds: dict[str, Any]) -> list[str]:
    """Markdown table: each student's metrics as mean ± standard deviation over its seeds, with n."""
    names = {"accuracy": ("Accuracy (%)", 100.0, ".2f"), "macro_f1": ("Macro-F1", 1.0, ".4f")}
    names |= {"roc_auc": ("ROC AUC", 1.0, ".4f"), "perplexity": ("Perplexity", 1.0, ".3f")}
    measured = [key for key in names if any(key in stats for stats in seeds["models"].values())]
    lines = [
        f"Over seeds {seeds['seeds']} (the rows `-seedS` above; mean ± sample standard deviation): a "
        "difference within the spread is not a difference.",
        "",
        "| Model | n | " + " | ".join(names[key][0] for key in measured) + " |",
        "|" + "---|" * (len(measured) + 2),
    ]
    for name, stats in seeds["models"].items():
        count = next(iter(stats.values()), {}).get("n", 0)
        cells = [format_mean(stats.get(key), names[key][2], names[key][1]) for key in measured]
        lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
    return lines


def _derived_lines(models: dict[str, Any]) -> list[str]:
    """Sentences comparing the distilled student with the teacher and the baseline."""
    distilled, teacher, baseline = models.get("distilled"), models.get("teacher"), models.get("baseline")
    if distilled is None:
        return []
    lines = []

    def both(first: dict[str, Any], second: dict[str, Any], key: str) -> bool:
        return is_number(first.get(key)) and is_number(second.get(key)) and second[key] != 0

    if teacher is not None and both(distilled, teacher, "accuracy"):
        keeps = 100.0 * distilled["accuracy"] / teacher["accuracy"]
        lines.append(f"- The distilled student keeps **{keeps:.1f}%** of the teacher's accuracy.")
    if baseline is not None and is_number(distilled.get("accuracy")) and is_number(baseline.get("accuracy")):
        points = 100.0 * (distilled["accuracy"] - baseline["accuracy"])
        lines.append(
            f"- **{points:+.2f} points** of accuracy against the baseline (the same student trained without a teacher)."
        )
    if teacher is not None and both(teacher, distilled, "parameters"):
        ratio = teacher["parameters"] / distilled["parameters"]
        lines.append(f"- {_compared(ratio, 'fewer parameters', 'more parameters', 'as many parameters')}.")
    teacher_latency = (teacher or {}).get("latency_ms") or {}
    student_latency = distilled.get("latency_ms") or {}
    if both(teacher_latency, student_latency, "1"):
        ratio = teacher_latency["1"] / student_latency["1"]
        lines.append(f"- {_compared(ratio, 'faster', 'slower', 'as fast')} at batch size 1.")
    return lines


def _compared(ratio: float, smaller: str, larger: str, same: str) -> str:
    """``ratio`` (teacher / student) in words: "**3.2x** fewer parameters than the teacher", "**1.5x** more
    parameters than the teacher" (a larger student), or, within 5%, where "1.0x fewer" would mislead, "about
    as many parameters as the teacher"."""
    if abs(ratio - 1.0) < 0.05:
        return f"About {same} as the teacher"
    if ratio > 1:
        return f"**{ratio:.1f}x** {smaller} than the teacher"
    return f"**{1 / ratio:.1f}x** {larger} than the teacher"


def _terms_table(terms: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the distillation terms: loss, weight, what it compares, hyper-parameters."""
    lines = ["| Loss | Weight | Compares | Parameters |", "|---|---|---|---|"]
    for term in terms:
        student, teacher = term.get("student") or "logits", term.get("teacher") or "logits"
        compares = f"{student} → {teacher}"
        if term.get("connector"):
            compares += f" (connector: {term['connector']})"
        params = ", ".join(f"{key}={value}" for key, value in (term.get("params") or {}).items())
        lines.append(
            f"| {term.get('loss', MISSING)} | {term.get('weight', MISSING)} | {compares} | {params or MISSING} |"
        )
    return lines


def _stage_times_table(
    stages_seconds: dict[str, Any], peak_memory: dict[str, Any] | None = None
) -> list[str]:
    """Markdown table of wall time (and peak memory) per stage, with a total row."""
    peak_memory = peak_memory or {}
    lines = ["| Stage | Seconds | h:mm:ss | Peak memory |", "|---|---|---|---|"]
    numbers = {stage: seconds for stage, seconds in stages_seconds.items() if is_number(seconds)}
    for stage, seconds in [*numbers.items(), ("**total**", sum(numbers.values()))]:
        whole = round(seconds)
        memory = peak_memory.get(stage) or {}
        shown = (
            f"{memory['peak_bytes'] / 2**20:,.0f} MiB ({'GPU' if memory.get('device') == 'cuda' else 'process RSS'})"
            if is_number(memory.get("peak_bytes"))
            else ""
        )
        lines.append(
            f"| {stage} | {seconds:.1f} | {whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d} | {shown} |"
        )
    return lines


def _per_class_table(models: list[tuple[str, dict[str, Any]]], summary: dict[str, Any]) -> list[str]:
    """Markdown table of per-class accuracy (%), one column per model that reports it."""
    with_classes = [
        (name, model["per_class_accuracy"]) for name, model in models if model.get("per_class_accuracy")
    ]
    if not with_classes:
        return []
    num_classes = max(len(values) for _, values in with_classes)
    class_names = summary.get("class_names") or []
    lines = [
        "| Class | " + " | ".join(name for name, _ in with_classes) + " |",
        "|" + "---|" * (len(with_classes) + 1),
    ]
    for index in range(num_classes):
        label = f"{index} ({class_names[index]})" if index < len(class_names) else str(index)
        cells = [
            format_number(values[index] if index < len(values) else None, ".2f", 100.0)
            for _, values in with_classes
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for a run directory.

    Args:
        run_dir: A run directory holding ``summary.json`` and, usually, ``metrics.jsonl``.

    Returns:
        The path of the written ``report.md``.

    Raises:
        AlambicError: ``summary.json`` is missing or is not valid JSON.

    Example:
        >>> report_path = write_report("runs/cifar10-kd")
        >>> print(report_path.read_text()[:200])
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # before the lock, which would create it
        raise AlambicError(f"run directory {run_dir} does not exist; point to a finished run directory")
    with run_lock(run_dir):  # one writer per run directory: not while a run or another command writes it
        return _write_report(run_dir)


def stage_weights(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{stage: {term name: weight}}`` of every stage of the run's plan (``summary["plan"]``); a summary
    written before the plan was recorded gives the distill stage's terms alone."""
    if summary.get("plan"):
        return {
            stage["stage"]: {term["name"]: term["weight"] for term in stage.get("terms", [])}
            for stage in summary["plan"]
        }
    terms = summary.get("terms") or []
    return {"distill": {term.get("name") or term.get("loss"): term.get("weight") for term in terms}}


def _write_report(run_dir: Path) -> Path:
    summary = _load_summary(run_dir)
    records, skipped = _load_metrics(run_dir)
    models = _ordered_models(summary.get("models") or {})
    plots_dir = run_dir / "plots"
    with writing(plots_dir):
        plots_dir.mkdir(parents=True, exist_ok=True)
    lines = _header_lines(summary, run_dir)
    lines += _models_lines(summary, models)
    lines += _training_lines(summary, records, skipped, plots_dir)
    lines += _trade_off_lines(models, plots_dir)
    per_class = _per_class_table(models, summary)
    if per_class:
        lines += ["", "## Per-class accuracy (%)", "", *per_class]
    report_path = run_dir / "report.md"
    text = "\n".join(lines).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    with writing(report_path):
        report_path.write_text(text, encoding="utf-8")
    return report_path


def _header_lines(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """The title and the run's data set, date and device."""
    lines = [f"# alambic report: {summary.get('run_name', run_dir.name)}", ""]
    size = "tokens in the vocabulary" if summary.get("task") == "causal-lm" else "classes"
    lines += [
        f"- Dataset: **{summary.get('dataset', MISSING)}** ({summary.get('num_classes', MISSING)} {size})"
    ]
    if summary.get("created"):
        lines.append(f"- Created: {summary['created']}")
    if summary.get("device"):
        lines.append(f"- Evaluated on: {summary['device']} ({summary.get('num_processes', 1)} process(es))")
    return lines


def _models_lines(summary: dict[str, Any], models: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The models' table and what is derived from it: seeds, comparisons, language-model sections, terms,
    stage times."""
    lines = ["", "## Models", ""]
    lines += _models_table(models) if models else ["No model results in summary.json."]
    latency_where = sorted(
        {
            f"{model['latency_device']}, {model.get('latency_threads', '?')} threads"
            for _, model in models
            if model.get("latency_device")
        }
    )
    lines += [
        "",
        "Accuracy and macro-F1 on the test split; size = safetensors file; MFLOPs per sample; "
        f"latency = median per batch{' on ' + '; '.join(latency_where) if latency_where else ''}.",
    ]
    if summary.get("seeds"):
        lines += ["", *_seeds_table(summary["seeds"])]
    derived = _derived_lines(summary.get("models") or {})
    if derived:
        lines += ["", *derived]
    if summary.get("task") == "causal-lm" and models:
        lines += ["", *language_model_lines(models), "", *sample_lines(models)]
    if summary.get("terms"):
        lines += ["", "## Distillation terms", "", *_terms_table(summary["terms"])]
    if summary.get("stages_seconds"):
        lines += [
            "",
            "## Stage wall times",
            "",
            *_stage_times_table(summary["stages_seconds"], summary.get("stages_peak_memory")),
        ]
    return lines


def _training_lines(summary: dict[str, Any], records: list[dict], skipped: int, plots_dir: Path) -> list[str]:
    """The training-curve and accuracy-per-epoch plots from ``metrics.jsonl``, or why they are missing."""
    lines = ["", "## Training curves", ""]
    if skipped:
        lines += [f"{skipped} malformed line(s) in metrics.jsonl were skipped.", ""]
    if not records:
        lines.append("metrics.jsonl is missing or empty, so the training-curve plots are skipped.")
    curves = partial(plot_training_curves, weights=stage_weights(summary))
    if make_plot(curves, records, plots_dir / "training_curves.png"):
        lines += [
            "Loss terms per stage against step (log scale where they span a decade), each as weighted in the total (`0.1 x ce`); "
            "black markers: test cross-entropy.",
            "",
        ]
        lines += ["![training curves](plots/training_curves.png)", ""]
    if make_plot(plot_accuracy_curves, records, plots_dir / "accuracy_curves.png"):
        lines += ["![test accuracy per epoch](plots/accuracy_curves.png)", ""]
    elif records:
        lines.append("No evaluation records in metrics.jsonl, so no accuracy-per-epoch plot.")
    return lines


def _trade_off_lines(models: list[tuple[str, dict[str, Any]]], plots_dir: Path) -> list[str]:
    """Accuracy against size and against batch-1 latency, or why a plot is missing."""
    lines = ["", "## Trade-offs", ""]
    if make_plot(plot_accuracy_vs_size, models, plots_dir / "accuracy_vs_size.png"):
        lines += ["![accuracy against size](plots/accuracy_vs_size.png)", ""]
    else:
        lines.append("No model reports both accuracy and size, so no accuracy-against-size plot.")
    if make_plot(plot_accuracy_vs_latency, models, plots_dir / "accuracy_vs_latency.png"):
        lines += ["![accuracy against latency](plots/accuracy_vs_latency.png)", ""]
    else:
        lines.append(
            "No model reports both accuracy and batch-1 latency, so no accuracy-against-latency plot."
        )
    return lines
