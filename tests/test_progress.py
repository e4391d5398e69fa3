"""Progress where people look: away from a terminal (nohup, SLURM, CI) a flushed line every ``log_every``
optimizer steps (stage, step, losses, tokens or samples a second, elapsed, ETA) and during evaluations
(windows or samples done of their total, ETA); on a terminal, the live bar shows evaluations too."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from corpora import word_corpus
from rich.console import Console

import alambic.console as console_module
from alambic import distill
from alambic.console import LogLines, ProgressBar
from alambic.core.callbacks import Throughput

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(
    r"^(teacher|baseline|distill) +step (\d+)/(\d+)  epoch (\d+)  (.*total [\d.e+-]+)  ([\d,]+) (tokens|samples)/s"
    r"  elapsed \d+:\d\d:\d\d  ETA (\?|\d+:\d\d:\d\d)$"
)
EVALUATION = re.compile(
    r"^(teacher|baseline|distill|evaluate \w+) +evaluating (\d+)/(\d+) (windows|samples)  elapsed \d+:\d\d:\d\d"
    r"  ETA (\?|\d+:\d\d:\d\d)$"
)


def _capture(monkeypatch, **options) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, **options))
    return out


def test_log_lines_write_every_report_and_a_few_lines_per_evaluation(monkeypatch):
    out = _capture(monkeypatch)
    lines = LogLines()
    for step in (5, 10, 15, 20):
        lines("distill", step, 40, {"total": 1.0 / step, "epoch": 1 + step // 20, "tokens_per_s": 1234.5})
    for done in range(0, 101, 7):  # 0, 7, ..., 98: then the last batch
        lines.evaluation("distill", done, 100, "windows")
    lines.evaluation("distill", 100, 100, "windows")
    written = out.getvalue().splitlines()
    steps = [STEP.match(line) for line in written if STEP.match(line)]
    assert [int(m[2]) for m in steps] == [5, 10, 15, 20] and all(m[6] == "1,234" for m in steps)
    assert "tokens_per_s" not in out.getvalue()  # a rate, not a loss
    assert steps[0][8] == "?" and steps[1][8] != "?"  # the ETA needs a pace
    done = [int(m[2]) for m in map(EVALUATION.match, written) if m]
    assert done == [0, 14, 21, 35, 42, 56, 63, 70, 84, 91, 100]  # the start, each tenth crossed, the end
    assert written.index(next(line for line in written if "epoch 1  step 15/40" in line)) < written.index(
        next(line for line in written if line.startswith("distill   step 20/40"))
    )  # epoch 1's line (no evaluation) as epoch 2's first report comes


def test_the_live_bar_shows_an_evaluation(monkeypatch):
    out = _capture(monkeypatch, force_terminal=True, width=150)
    with ProgressBar() as bar:
        bar("distill", 10, 40, {"total": 1.5, "epoch": 1, "tokens_per_s": 100.0})
        bar.evaluation("distill", 0, 48, "windows")
        bar.evaluation("distill", 24, 48, "windows")
        bar.progress.refresh()
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
        assert "distill eval" in text and "24/48" in text and "windows" in text
        assert "total 1.5 epoch 1 100 tokens/s" in text  # the training rate as a rate
        bar.evaluation("distill", 48, 48, "windows")
        assert [task.description for task in bar.progress.tasks] == ["distill"]  # removed when done


def test_throughput_counts_tokens_without_padding_or_samples():
    meter = Throughput(processes=2)
    meter.add({"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])})
    meter.add({"input_ids": torch.ones(3, 4)})
    meter.since -= 1.0  # one second ago
    assert meter.rate() == {"tokens_per_s": pytest.approx((7 + 12) * 2, rel=0.05)}
    meter = Throughput()
    meter.add(torch.ones(8, 3))
    meter.since -= 2.0
    assert meter.rate() == {"samples_per_s": pytest.approx(4, rel=0.05)}


def test_a_redirected_run_logs_steps_and_evaluations(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    corpus = word_corpus(tmp_path / "corpus.txt")
    train = {"max_steps": 9, "batch_size": 16, "optimizer": "adamw", "lr": 0.003, "log_every": 3}
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 64}
    config = {
        "name": "progress",
        "task": "causal-lm",
        "data": {"dataset": "text", "train_file": str(corpus), "tokenizer": "chars", "block_size": 16,
                 "eval_batch_size": 8},
        "teacher": {"model": {"arch": "hf-config", "kwargs": {**gpt2, "n_embd": 16}}, "train": train},
        "student": {"model": {"arch": "hf-config", "kwargs": {**gpt2, "n_embd": 8}}},
        "distill": {"train": train},
        "evaluate": {"batch_sizes": [1], "latency_repeats": 1},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env |= {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "alambic.cli",
        "run",
        str(tmp_path / "run.yaml"),
        "--out",
        str(tmp_path / "run"),
    ]
    with open(tmp_path / "out.txt", "w") as stdout:  # a file, as nohup and SLURM give
        result = subprocess.run(
            command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=300
        )
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out.txt").read_text().splitlines()
    steps = [m for m in map(STEP.match, text) if m]
    assert [(m[1], int(m[2]), int(m[3])) for m in steps] == [
        (stage, step, 9) for stage in ("teacher", "baseline", "distill") for step in (3, 6, 9)
    ]
    assert all(m[7] == "tokens" and int(m[6].replace(",", "")) > 0 for m in steps)
    evaluations = [m for m in map(EVALUATION.match, text) if m]
    labels = ("teacher", "baseline", "distill", "evaluate teacher", "evaluate baseline", "evaluate distilled")
    for label in labels:  # per-epoch and final evaluations: from 0 to every held-out window, in steps
        done = [int(m[2]) for m in evaluations if m[1] == label]
        total = {int(m[3]) for m in evaluations if m[1] == label}
        assert done[0] == 0 and len(total) == 1 and done[-1] == total.pop() and len(done) >= 3, label


def test_distill_progress_true_writes_a_line_every_log_every_steps(capsys):
    inputs, labels = torch.randn(256, 10), torch.randint(0, 3, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=32)
    distill(torch.nn.Linear(10, 3), torch.nn.Linear(10, 3), loader, epochs=2, progress=True, log_every=3)
    lines = capsys.readouterr().out.splitlines()
    step = re.compile(
        r"^distill step (\d+)/16 epoch (\d) ce \S+ kd \S+ total \S+ [\d,]+ samples/s \([\d.]+ s(, ETA [\d.]+ s)?\)$"
    )
    assert [int(m[1]) for m in map(step.match, lines) if m] == [3, 6, 9, 12, 15]
    assert [line.split(" step ")[0] for line in lines if " epoch " in line and "train_total" in line] == [
        "distill epoch 1/2",
        "distill epoch 2/2",
    ]
