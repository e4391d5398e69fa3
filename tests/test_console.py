"""What the command line shows away from a terminal (nohup, SLURM, CI): one plain line per epoch with its
ETA, tables at full width; and on a terminal, the live bar's ETA. (The redirected run also tracks to
TensorBoard from its config.)"""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import alambic.console as console_module
from alambic.console import EpochLines, ProgressBar

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^(teacher|baseline|distill) +epoch (\d+)/2  step (\d+)/(\d+)  (.*)  elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$"
)


def _capture(monkeypatch, **options) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, **options))
    return out


def test_epoch_lines_one_per_epoch_with_or_without_an_evaluation(monkeypatch):
    out = _capture(monkeypatch)
    lines = EpochLines()
    lines("distill", 5, 40, {"total": 2.0, "epoch": 1})
    lines("distill", 10, 40, {"total": 1.5, "epoch": 1})
    lines("distill", 15, 40, {"total": 1.25, "epoch": 2})  # epoch 1 had no evaluation: written now
    lines("distill", 20, 40, {"test_accuracy": 0.5, "epoch": 2})  # an evaluation ends epoch 2
    lines("distill", 25, 40, {"total": 1.0, "epoch": 3})
    lines.finish()  # the stage stopped (or the run failed) inside epoch 3
    written = out.getvalue().splitlines()
    assert [re.search(r"epoch \S+", line)[0] for line in written] == ["epoch 1", "epoch 2/4", "epoch 3/4"]
    assert "total 1.5" in written[0] and "test_accuracy" not in written[0]
    assert "step 20/40  total 1.25 test_accuracy 0.5  elapsed" in written[1]
    assert "test_accuracy" not in written[2] and all(" ETA " in line for line in written)


def test_the_live_bar_shows_an_eta_on_a_terminal(monkeypatch):
    out = _capture(monkeypatch, force_terminal=True, width=150)
    with ProgressBar() as bar:
        assert bar.live
        bar("teacher", 10, 40, {"total": 1.5, "epoch": 1})
        bar("teacher", 20, 40, {"test_accuracy": 0.75, "epoch": 2})
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # colours differ between terminals
    assert (
        re.search(r"ETA (-:--:--|\d+:\d\d:\d\d)", text)
        and "20/40" in text
        and "total 1.5" in text
        and "test_accuracy 0.75" in text
    )


@pytest.mark.slow
def test_a_redirected_run_writes_epoch_lines_and_whole_tables(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")
    }
    env |= {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "alambic.cli", "run", str(ROOT / "recipes" / "digits.yaml"), "--out",
               str(tmp_path / "run"), "--set", "teacher.train.epochs=2", "--set", "distill.train.epochs=2",
               "--set", "evaluate.latency_repeats=2", "--set", "name=a-run-name-long-enough-to-widen-the-table-title", "--set", "tracking=[tensorboard]"]  # fmt: skip
    with open(tmp_path / "out.txt", "w") as stdout:  # a file, as nohup and SLURM give
        result = subprocess.run(
            command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=600
        )
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out.txt").read_text()
    epochs = [LINE.match(line) for line in text.splitlines() if LINE.match(line)]
    assert [(m[1], m[2]) for m in epochs] == [
        (stage, e) for stage in ("teacher", "baseline", "distill") for e in "12"
    ]
    assert all("test_accuracy" in m[5] and "total" in m[5] for m in epochs)
    assert all(int(m[3]) == int(m[4]) // 2 * int(m[2]) for m in epochs)  # the step at each epoch's end
    assert "…" not in text  # nothing cut
    table = [line for line in text.splitlines() if line.startswith("│ distilled")]
    assert table and len(table[0]) > 80 and re.search(r"│ +\d+\.\d\d │", table[0])
    for stage in ("teacher", "baseline", "distill"):  # tracking from the run config: one run per stage
        assert list((tmp_path / "run" / "tracking" / stage).glob("a-run-name-*/events.out.tfevents.*")), stage
