"""One writer per run directory: a second one is refused in one line; a killed holder never blocks."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from alambic import distill
from alambic.cli import app
from alambic.config import dump_config, load_config
from alambic.core.lock import LOCK_NAME, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "recipes" / "digits.yaml")
runner = CliRunner()

# What a running alambic process leaves on its lock: an flock held on RUN_DIR/.lock with its identity.
HOLDER = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
handle = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.write(f"process {os.getpid()} on testhost since 2024-01-01T00:00:00+00:00")
handle.flush()
print("held", flush=True)
time.sleep(120)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _kill(holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays, with its dead holder's name
    holder.wait()


def _tiny_distill(run_dir) -> nn.Module:
    torch.manual_seed(0)
    inputs, labels = torch.randn(64, 4), torch.randint(0, 3, (64,))
    return distill(
        nn.Linear(4, 3),
        nn.Linear(4, 3),
        DataLoader(TensorDataset(inputs, labels), batch_size=16),
        log_every=1,
        run_dir=run_dir,
    )


def _one_line(result, pattern: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert pattern in text, text


def test_a_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "kd"
    holder = _hold(run_dir)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} on testhost since 2024"):
            _tiny_distill(run_dir)
        result = runner.invoke(app, ["run", DIGITS, "--out", str(run_dir)], catch_exceptions=False)
        _one_line(result, f"run directory {run_dir} is in use by process {holder.pid}")
        assert os.listdir(run_dir) == [LOCK_NAME]  # the refused writers wrote nothing
    finally:
        _kill(holder)
    assert (run_dir / LOCK_NAME).is_file()  # a stale lock file, no longer locked by anyone
    _tiny_distill(run_dir)
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / LOCK_NAME).exists()


def test_resume_report_and_export_of_a_running_run_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(load_config(DIGITS)))
    holder = _hold(run_dir)
    try:
        commands = (
            ["run", DIGITS, "--resume", str(run_dir)],
            ["eval", str(run_dir)],
            ["report", str(run_dir)],
            ["export", str(run_dir)],
        )
        for command in commands:
            _one_line(runner.invoke(app, command, catch_exceptions=False), f"in use by process {holder.pid}")
    finally:
        _kill(holder)
    assert sorted(os.listdir(run_dir)) == [LOCK_NAME, "config.yaml"]


def test_distill_creates_a_relative_nested_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_distill("runs/nested/my-kd")  # the README's example, with no runs/ folder yet
    assert (tmp_path / "runs" / "nested" / "my-kd" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "nested" / "my-kd" / "checkpoints" / "latest.json").is_file()


# Each of two processes enters the same run directories at the same moment (a file barrier per round):
# distill() rounds, whose training waits long enough for the two to overlap, then pipeline runs.
RACER = """
import os, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from alambic import distill, load_config
from alambic.run.pipeline import run
from alambic.core.lock import RunLockedError
from alambic.errors import ConfigError

root, me, recipe = sys.argv[1], sys.argv[2], sys.argv[3]

class SlowSet(TensorDataset):
    def __getitem__(self, index):
        time.sleep(0.05)
        return super().__getitem__(index)

def barrier(name):
    open(os.path.join(root, f"{name}.{me}"), "w").close()
    while len([f for f in os.listdir(root) if f.startswith(name + ".")]) < 2:
        time.sleep(0.002)

def attempt(name, work):
    barrier("ready-" + name)
    started = time.time()
    try:
        work()
        print(name, "ran", started, time.time(), flush=True)
    except RunLockedError as error:
        print(name, "refused", str(error).count(chr(10)), flush=True)
    except ConfigError as error:  # the other run had already written its config: refused as well
        print(name, "exists" if "already exists" in str(error) else "failed", flush=True)
    except Exception as error:  # any other failure is reported, and the other process is not left waiting
        print(name, "failed", type(error).__name__, flush=True)

for round in range(3):
    data = SlowSet(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    attempt(f"distill{round}", lambda: distill(nn.Linear(4, 3), nn.Linear(4, 3), DataLoader(data, batch_size=4), log_every=1,
                                               run_dir=os.path.join(root, f"kd{round}")))
config = load_config(recipe, ["teacher.train.epochs=1", "stages=[teacher]", "data.train_subset=200"])
for round in range(2):
    attempt(f"pipeline{round}", lambda: run(config, run_dir=os.path.join(root, f"run{round}")))
"""


@pytest.mark.slow
def test_two_simultaneous_writers_never_both_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RACER), str(tmp_path), str(index), DIGITS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for index in range(2)
    ]
    try:
        outputs = [racer.communicate(timeout=300) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    for racer, (_, err) in zip(racers, outputs):
        assert racer.returncode == 0, err[-3000:]
    outcomes: dict[str, list[str]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for out, _ in outputs:
        for line in out.splitlines():
            name, outcome, *rest = line.split()
            outcomes.setdefault(name, []).append(outcome)
            if outcome == "ran":
                spans.setdefault(name, []).append((float(rest[0]), float(rest[1])))
            else:
                assert rest in ([], ["0"])  # a refusal is one line
    rounds = [f"distill{r}" for r in range(3)] + [f"pipeline{r}" for r in range(2)]
    assert sorted(outcomes) == sorted(rounds)
    for name in rounds:
        assert "failed" not in outcomes[name] and "ran" in outcomes[name], (name, outcomes[name])
        # on a loaded machine one process may start after the other has finished: both then ran, in turn
        # (a pipeline round's second sees the finished run: "exists"); never both at once
        if outcomes[name].count("ran") == 2:
            (first_start, first_end), (second_start, second_end) = sorted(spans[name])
            assert first_end <= second_start, (name, spans[name])
    for r in range(3):  # one run's rows only: each step logged once
        records = [
            json.loads(line) for line in (tmp_path / f"kd{r}" / "metrics.jsonl").read_text().splitlines()
        ]
        keys = [(record["kind"], record["step"]) for record in records]
        assert len(keys) == len(set(keys))
    for r in range(2):
        assert json.loads((tmp_path / f"run{r}" / "status.json").read_text())["state"] == "completed"


def test_report_of_a_missing_directory_creates_nothing_and_an_export_elsewhere_needs_no_lock(tmp_path):
    missing = tmp_path / "no" / "such" / "run"
    result = runner.invoke(app, ["report", str(missing)], catch_exceptions=False)
    _one_line(result, f"run directory {missing} does not exist")
    assert not (tmp_path / "no").exists()
    from alambic.run.artifacts import export_run

    run_dir = tmp_path / "kd"
    sets = ["--set", "stages=[teacher]", "--set", "teacher.train.epochs=1"]
    trained = runner.invoke(app, ["run", DIGITS, *sets, "--out", str(run_dir)], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    holder = _hold(run_dir)
    try:  # the run is busy: an export into it is refused, an export elsewhere only reads it
        with pytest.raises(RunLockedError):
            export_run(run_dir, model="teacher", export_format="safetensors")
        report = export_run(
            run_dir, tmp_path / "out" / "teacher.safetensors", model="teacher", export_format="safetensors"
        )
        assert Path(report["path"]).is_file() and not (run_dir / "export").exists()
    finally:
        _kill(holder)
