"""Tests for alambic.run.report: a fake run directory in, report.md and PNG plots out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alambic.errors import AlambicError
from alambic.run.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("training_curves.png", "accuracy_curves.png", "accuracy_vs_size.png", "accuracy_vs_latency.png")


def _model(architecture: str, accuracy: float, parameters: int, latency_1: float, latency_64: float) -> dict:
    errors = round((1 - accuracy) * 10000)
    return {
        "architecture": architecture,
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.001,
        "errors": errors,
        "num_samples": 10000,
        "per_class_accuracy": [accuracy + 0.01, accuracy - 0.01, float("nan")],
        "parameters": parameters,
        "size_bytes": parameters * 4 + 1000,
        "flops": parameters * 50,
        "latency_ms": {"1": latency_1, "64": latency_64},
    }


SUMMARY = {
    "run_name": "cifar10-kd",
    "dataset": "cifar10",
    "num_classes": 3,
    "created": "2025-01-01T12:00:00",
    "models": {
        "distilled": _model("resnet8", 0.9, 78_042, 1.0, 10.0),
        "teacher": _model("resnet32", 0.93, 464_154, 5.0, 80.0),
        "baseline": _model("resnet8", 0.88, 78_042, 1.0, 10.0),
        "int8": {"architecture": "resnet8-int8", "accuracy": 0.895, "size_bytes": 25_000},
    },
    "stages_seconds": {"teacher": 3723.4, "baseline": 100.0, "distill": 200.5},
    "terms": [
        {"loss": "ce", "weight": 0.1, "params": {}},
        {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}},
        {"loss": "mse", "weight": 1.0, "student": "layer2", "teacher": "layer3", "connector": "conv1x1"},
    ],
}


def _metrics_records() -> list[dict]:
    records = []
    for stage, terms in (("teacher", ("ce", "total")), ("distill", ("ce", "kd", "total"))):
        for epoch in range(3):
            for step in range(epoch * 10, epoch * 10 + 10, 2):
                losses = {term: 2.0 / (1 + step) + index for index, term in enumerate(terms)}
                records.append(
                    {
                        "stage": stage,
                        "kind": "train",
                        "epoch": epoch,
                        "step": step,
                        "lr": 0.1,
                        "losses": losses,
                    }
                )
            records.append(
                {
                    "stage": stage,
                    "kind": "eval",
                    "epoch": epoch,
                    "step": epoch * 10 + 9,
                    "accuracy": 0.5 + 0.1 * epoch,
                    "macro_f1": 0.5,
                    "loss": 1.0 / (1 + epoch),
                }
            )
    return records


def _make_run_dir(path: Path, *, metrics: list[dict] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(SUMMARY))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in metrics))
    return path


def test_report_table_rows_and_derived_lines(tmp_path: Path) -> None:
    report_path = write_report(_make_run_dir(tmp_path / "run", metrics=_metrics_records()))
    text = report_path.read_text()

    assert report_path == tmp_path / "run" / "report.md"
    assert "cifar10" in text
    header = "| Model | Architecture | Accuracy (%) | Macro-F1 | Errors | Params | Size (MB) | MFLOPs | Latency b1 (ms) | Latency b64 (ms) |"
    assert header in text
    assert (
        "| teacher | resnet32 | 93.00 | 0.9290 | 700 / 10000 | 464,154 | 1.86 | 23.2 | 5.00 | 80.0 |" in text
    )
    assert (
        "| distilled | resnet8 | 90.00 | 0.8990 | 1000 / 10000 | 78,042 | 0.313 | 3.90 | 1.00 | 10.0 |"
        in text
    )
    assert "| int8 | resnet8-int8 | 89.50 | — | — | — | 0.0250 | — | — | — |" in text
    # Teacher, baseline, distilled come first, whatever the order in summary.json.
    assert (
        text.index("| teacher |")
        < text.index("| baseline |")
        < text.index("| distilled |")
        < text.index("| int8 |")
    )

    assert "keeps **96.8%** of the teacher's accuracy" in text  # 0.90 / 0.93
    assert "**+2.00 points**" in text  # 0.90 - 0.88
    assert "**5.9x** fewer parameters" in text  # 464154 / 78042
    assert "**5.0x** faster" in text  # 5.0 ms / 1.0 ms

    assert "| kd | 0.9 | logits → logits | temperature=4 |" in text
    assert "| mse | 1.0 | layer2 → layer3 (connector: conv1x1) | — |" in text
    assert "| teacher | 3723.4 | 1:02:03 |" in text
    assert "| **total** | 4023.9 | 1:07:04 |" in text
    # Per-class accuracy: one column per model that reports it; NaN (no samples) shows a dash.
    assert "| Class | teacher | baseline | distilled |" in text
    assert "| 0 | 94.00 | 89.00 | 91.00 |" in text
    assert "| 2 | — | — | — |" in text


def test_report_writes_valid_pngs(tmp_path: Path) -> None:
    run_dir = _make_run_dir(tmp_path / "run", metrics=_metrics_records())
    text = write_report(run_dir).read_text()
    for name in PLOTS:
        path = run_dir / "plots" / name
        assert path.is_file(), name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name})" in text, name


def test_report_without_metrics_skips_curves(tmp_path: Path) -> None:
    run_dir = _make_run_dir(tmp_path / "run", metrics=None)
    text = write_report(run_dir).read_text()
    assert "metrics.jsonl is missing or empty" in text
    assert not (run_dir / "plots" / "training_curves.png").exists()
    assert not (run_dir / "plots" / "accuracy_curves.png").exists()
    assert (run_dir / "plots" / "accuracy_vs_size.png").read_bytes()[:8] == PNG_MAGIC


def test_report_removes_stale_plots(tmp_path: Path) -> None:
    run_dir = _make_run_dir(tmp_path / "run", metrics=_metrics_records())
    write_report(run_dir)
    (run_dir / "metrics.jsonl").unlink()
    text = write_report(run_dir).read_text()
    assert not (run_dir / "plots" / "training_curves.png").exists()  # not left over from the first report
    assert "plots/training_curves.png" not in text


def test_report_skips_truncated_metrics_line(tmp_path: Path) -> None:
    run_dir = _make_run_dir(tmp_path / "run", metrics=_metrics_records())
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"stage": "distill", "kind": "tra')  # a run killed mid-write
    text = write_report(run_dir).read_text()
    assert "1 malformed line(s)" in text
    assert (run_dir / "plots" / "training_curves.png").is_file()


def test_report_with_only_a_student(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = {
        "run_name": "solo",
        "dataset": "mnist",
        "models": {"distilled": _model("mlp", 0.97, 1000, 0.1, 0.5)},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("")
    text = write_report(run_dir).read_text()
    assert "| distilled | mlp | 97.00 |" in text
    assert "teacher's accuracy" not in text
    assert "over the baseline" not in text


def test_missing_summary_raises(tmp_path: Path) -> None:
    with pytest.raises(AlambicError, match="no summary.json") as error:
        write_report(tmp_path)
    assert "alambic" in str(error.value)  # names the command that writes it


def test_a_student_of_the_teachers_size_is_not_called_1_0x_smaller(tmp_path: Path) -> None:
    summary = {
        **SUMMARY,
        "models": {
            "teacher": _model("mlp", 0.93, 2410, 1.0, 10.0),
            "distilled": _model("mlp", 0.9, 2410, 1.25, 10.0),
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path).read_text()
    assert "About as many parameters as the teacher." in text and "1.0x" not in text
    assert "**1.2x** slower than the teacher at batch size 1" in text  # 1.25 ms against 1.0 ms


def test_training_curves_say_each_term_is_weighted_and_steps_are_integers(tmp_path, monkeypatch) -> None:
    from alambic.run import plots

    figures, new_figure = [], plots.new_figure
    monkeypatch.setattr(plots, "new_figure", lambda *size: figures.append(new_figure(*size)) or figures[-1])
    weights = {"distill": {"ce": 0.1, "kd": 0.9}}
    assert plots.plot_training_curves(_metrics_records(), tmp_path / "curves.png", weights=weights)
    teacher, distill = figures[0].axes
    legend = [text.get_text() for text in distill.get_legend().get_texts()]
    assert legend == ["0.1 x ce", "0.9 x kd", "total", "test ce"]
    assert [text.get_text() for text in teacher.get_legend().get_texts()][0] == "ce"
    ticks = distill.get_xticks()
    assert all(float(tick).is_integer() for tick in ticks)
