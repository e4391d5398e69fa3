"""``report.md`` and ``plots/compress.png`` of ``alambic compress``, from its ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alambic.core.checkpoint import atomic_write_text
from alambic.run.plots import model_colors, model_legend, model_points, new_figure, scatter


def number_cell(value: Any, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted, or a dash when it is missing (a non-finite metric is null)."""
    return format(value * scale, spec) if isinstance(value, int | float) else "—"


def latency_sizes(rows: dict[str, dict]) -> list[str]:
    """The batch sizes (``evaluate.batch_sizes`` of the run) the rows were timed at, in increasing order."""
    timed = {
        size for row in rows.values() for key in ("latency_ms", "onnxruntime_latency_ms") for size in row[key]
    }
    return sorted(timed, key=int)


def export_checks(summary: dict) -> list[dict[str, Any]]:
    """Every exported file with its check against the model it came from: format, row, path, size, the largest
    absolute difference of the outputs and the fraction of predictions that agree (the int8 ONNX file is
    checked against the float ONNX file it was quantized from)."""
    checks = [
        {
            "format": export["format"],
            "model": export.get("model", "distilled"),
            "path": export["path"],
            "size_bytes": export["size_bytes"],
            "max_abs_diff": export["max_abs_diff"],
            "prediction_agreement": export.get("prediction_agreement"),
            "against": f"PyTorch on {export['checked_samples']} test inputs",
            "runtime": export["runtime"],
        }
        for export in summary["exports"]
    ]
    int8 = summary.get("int8_export")
    if int8:
        checks.append(
            {
                "format": "onnx int8",
                "model": "int8",
                "path": int8["path"],
                "size_bytes": int8["size_bytes"],
                "max_abs_diff": int8["max_abs_diff_to_float"],
                "prediction_agreement": int8.get("prediction_agreement_to_float"),
                "against": f"the float ONNX file of {int8['quantized_from']}",
                "runtime": "onnxruntime",
            }
        )
    return checks


def write_compress_report(folder: str | Path) -> Path:
    """``report.md`` (one row per stage, then every exported file's check) and ``plots/compress.png`` from
    ``summary.json`` in ``folder``."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    rows = summary["models"]
    sizes = latency_sizes(rows)
    header = ["model", "acc %", "params", "sparsity %", "MB on disk", "MFLOPs"]
    header += [f"torch ms@{size}" for size in sizes] + [f"ORT ms@{size}" for size in sizes]
    lines = [
        f"# Compression of {summary['run_name']} ({summary['dataset']})",
        "",
        f"Accuracy on {summary['evaluated_samples']:,} of {summary['test_samples']:,} test samples. "
        "Size: safetensors file (int8: the ONNX file). Latency: median ms per batch on CPU, "
        f"{next(iter(rows.values()))['latency_threads']} thread(s).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, row in rows.items():
        cells = [
            name,
            number_cell(row["accuracy"], ".2f", 100),
            f"{row['parameters']:,}",
            number_cell(row.get("sparsity"), ".1f", 100),
            number_cell(row["size_bytes"], ".3f", 1e-6),
            number_cell(row["flops"], ".3g", 1e-6),
        ]
        cells += [number_cell(row["latency_ms"].get(size), ".3g") for size in sizes]
        cells += [number_cell(row["onnxruntime_latency_ms"].get(size), ".3g") for size in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Exported files",
        "",
        "| file | format | row | bytes | max abs difference | predictions agreeing % | checked against | run by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for check in export_checks(summary):
        lines.append(
            f"| `{check['path']}` | {check['format']} | {check['model']} | {check['size_bytes']:,} | "
            f"{check['max_abs_diff']:.2e} | {number_cell(check['prediction_agreement'], '.2f', 100)} | "
            f"{check['against']} | {check['runtime']} |"
        )
    plotted = _plot(rows, folder / "plots" / "compress.png", sizes[-1] if sizes else None)
    if plotted:
        lines += ["", "![accuracy against latency and size](plots/compress.png)"]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _plot(rows: dict[str, dict], path: Path, batch: str | None) -> bool:
    """Accuracy against onnxruntime latency (largest batch) and against size on disk."""
    if batch is None:
        return False
    models = list(rows.items())
    by_latency = model_points(models, lambda row: row["onnxruntime_latency_ms"].get(batch))
    by_size = model_points(models, lambda row: row["size_bytes"] / 1e6)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = new_figure(10.0, 4.2)
    left, right = figure.subplots(1, 2)
    scatter(left, by_latency, f"onnxruntime latency at batch {batch} (ms)", model_colors(models))
    scatter(right, by_size, "size on disk (MB)", model_colors(models))
    model_legend(figure, (left, right))
    figure.suptitle("Accuracy against latency and size, per compression stage")
    figure.savefig(path)
    return True
