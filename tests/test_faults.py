"""Faults in what alambic reads or writes: each gives one line naming the file and what to do (exit 2).

Damaged weights and checkpoints, damaged teacher caches, damaged data and custom data, a disk that
refuses writes, SIGTERM, and non-finite metrics (valid JSON, listed by name).
"""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import alambic.core.checkpoint as checkpoint_module
from alambic.cli import app
from alambic.config import load_config
from alambic.core.cache import CachedTeacher, cache_teacher
from alambic.core.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from alambic.data import build_datasets
from alambic.data.readers import read_idx
from alambic.errors import AlambicError, DataError, OutputError
from alambic.run.rundir import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

FACTORIES = """
import torch
from torch.utils.data import TensorDataset

def blobs(nan_in_test=False, label_shift=0, num_classes=3):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 8, generator=generator)
    labels = torch.arange(96) % 3
    test_inputs = inputs[:24].clone()
    if nan_in_test:
        test_inputs[0, 0] = float("nan")
    return TensorDataset(inputs, labels + label_shift), TensorDataset(test_inputs, labels[:24]), num_classes

def broken():
    raise FileNotFoundError("no such file: /data/mine.csv")
"""

CONFIG = """
name: tiny
output_dir: runs
seed: 0
data: {dataset: custom, factory: "alambic_fault_factories:blobs"}
teacher:
  model: {arch: mlp, kwargs: {hidden: [16]}}
  train: {epochs: 1, batch_size: 32, lr: 0.01}
student:
  model: {arch: mlp, kwargs: {hidden: [8]}}
distill:
  terms: [{loss: kd, weight: 1.0}]
  train: {epochs: 1, batch_size: 32, lr: 0.01}
evaluate: {latency_repeats: 1, batch_sizes: [1]}
"""


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    (folder / "alambic_fault_factories.py").write_text(FACTORIES)
    (folder / "tiny.yaml").write_text(CONFIG)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def finished_run(setup_dir):
    """A finished tiny run; tests damage copies of it."""
    run_dir = setup_dir / "finished"
    assert _run("run", setup_dir / "tiny.yaml", "--out", run_dir).exit_code == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _run(*args):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def _one_line_error(result, *patterns):
    """Exit 2, no traceback, and one ``error:`` line that holds every pattern."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for pattern in patterns:
        assert pattern in errors[0], errors[0]
    return errors[0]


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # not safetensors at all
        path.write_text("this is not a weights file\n")


# --------------------------------------------------------------------------------------------------
# model and checkpoint files


@pytest.mark.parametrize("how", ["truncated", "empty", "text"])
def test_damaged_stage_weights_are_one_line(run_copy, how):
    weights = run_copy / "student" / "model.safetensors"
    _damage(weights, how)
    status = (run_copy / "status.json").read_text()
    _one_line_error(_run("eval", run_copy), str(weights), "delete")
    assert (run_copy / "status.json").read_text() == status  # the run is left as it was


@pytest.mark.parametrize("how", ["truncated", "empty", "text"])
def test_damaged_teacher_checkpoint_and_eval_checkpoint(finished_run, setup_dir, tmp_path, how):
    weights = tmp_path / f"teacher-{how}.safetensors"
    shutil.copy(finished_run / "teacher" / "model.safetensors", weights)
    _damage(weights, how)
    result = _run(
        "run",
        setup_dir / "tiny.yaml",
        "--set",
        f"teacher.model.checkpoint={weights}",
        "--out",
        tmp_path / "r",
    )
    _one_line_error(result, str(weights))
    torch_file = tmp_path / f"model-{how}.pt"
    torch.save({"weight": torch.ones(3)}, torch_file)
    _damage(torch_file, how)
    _one_line_error(_run("eval", torch_file, "--arch", "mlp", "--dataset", "digits"), str(torch_file))


def _training_state(directory: Path, width: int = 4):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"module": module, "optimizer": optimizer, "scheduler": scheduler}


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda ckpt: _damage(ckpt / "state.json", "truncated"), "state.json"),
        (lambda ckpt: _damage(ckpt.parent / "latest.json", "truncated"), "latest.json"),
        (lambda ckpt: (ckpt / "optimizer.safetensors").unlink(), "optimizer.safetensors"),
        (lambda ckpt: (ckpt / "rng-0.safetensors").unlink(), "rng-0.safetensors"),
        (lambda ckpt: _damage(ckpt / "model.safetensors", "truncated"), "model.safetensors"),
    ],
)
def test_damaged_training_checkpoint_names_the_file(tmp_path, damage, named):
    parts = _training_state(tmp_path)
    save_training_state(tmp_path, epoch=0, step=3, **parts)
    damage(tmp_path / "ckpt-0000")
    with pytest.raises(AlambicError, match=named) as caught:
        load_training_state(latest_checkpoint(tmp_path), **_training_state(tmp_path))
    assert "\n" not in str(caught.value) and "--resume" in str(caught.value)


def _flip_last_byte(path: Path) -> None:
    """One bit of the file's last tensor flipped: still a valid safetensors file, silently other weights."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda ckpt: _flip_last_byte(ckpt / "model.safetensors"), "model.safetensors"),
        (lambda ckpt: _flip_last_byte(ckpt / "optimizer.safetensors"), "optimizer.safetensors"),
        (lambda ckpt: _flip_last_byte(ckpt / "rng-0.safetensors"), "rng-0.safetensors"),
        (
            lambda ckpt: (ckpt / "state.json").write_text(
                (ckpt / "state.json").read_text().replace("3", "4")
            ),
            "state.json",
        ),
    ],
)
def test_checkpoint_whose_bytes_changed_is_refused_by_its_checksum(tmp_path, damage, named):
    parts = _training_state(tmp_path)
    save_training_state(tmp_path, epoch=0, step=3, **parts)
    checkpoint = latest_checkpoint(tmp_path)
    listed = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert set(listed) == {"model.safetensors", "optimizer.safetensors", "rng-0.safetensors", "state.json"}
    damage(checkpoint)
    with pytest.raises(AlambicError, match=f"{named} does not match the checksum") as caught:
        load_training_state(checkpoint, **_training_state(tmp_path))
    assert "\n" not in str(caught.value) and f"delete {tmp_path}" in str(caught.value)


def test_checkpoint_without_checksums_still_resumes(tmp_path):
    """Checkpoints written before checksums.json existed load as before (unverified)."""
    parts = _training_state(tmp_path)
    save_training_state(tmp_path, epoch=0, step=3, **parts)
    (tmp_path / "ckpt-0000" / "checksums.json").unlink()
    restored = _training_state(tmp_path, width=4)
    torch.nn.init.zeros_(restored["module"][0].weight)
    assert load_training_state(tmp_path / "ckpt-0000", **restored) == (0, 3)
    assert torch.equal(restored["module"][0].weight, parts["module"][0].weight)


def test_checkpoint_of_another_shape_names_the_first_mismatching_tensor(tmp_path):
    save_training_state(tmp_path, epoch=0, step=3, **_training_state(tmp_path, width=4))
    with pytest.raises(AlambicError, match=r"0\.weight: expected \(5, 3\), got \(4, 3\)"):
        load_training_state(tmp_path / "ckpt-0000", **_training_state(tmp_path, width=5))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda ckpt: _damage(ckpt / "state.json", "truncated"), "state.json"),
        (lambda ckpt: _flip_last_byte(ckpt / "model.safetensors"), "model.safetensors does not match"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_one_line(finished_run, setup_dir, tmp_path, damage, named):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    args = ["--set", "teacher.train.epochs=2"]
    # a stopped run: the teacher has a checkpoint but no final model yet
    shutil.rmtree(run_dir)
    assert (
        _run("run", setup_dir / "tiny.yaml", *args, "--set", "stages=[teacher]", "--out", run_dir).exit_code
        == 0
    )
    (run_dir / "teacher" / "model.safetensors").unlink()
    damage(run_dir / "teacher" / "checkpoints" / "ckpt-0001")
    result = _run("run", setup_dir / "tiny.yaml", *args, "--set", "stages=[teacher]", "--resume", run_dir)
    _one_line_error(result, named, "--resume")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


# --------------------------------------------------------------------------------------------------
# teacher caches


@pytest.fixture
def cache(tmp_path):
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 3)
    folder = tmp_path / "cache"
    cache_teacher(teacher, dataset, folder, batch_size=4, shard_size=4)
    return folder


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: _damage(f / "logits-00001.npy", "truncated"), "logits-00001.npy"),
        (lambda f: np.save(f / "logits-00001.npy", np.zeros((2, 3), np.float32)), "logits-00001.npy"),
        (lambda f: (f / "logits-00002.npy").unlink(), "logits-00002.npy is missing"),
        (lambda f: _damage(f / "manifest.json", "truncated"), "not valid JSON"),
        (lambda f: _edit_manifest(f, lambda m: m.pop("shard_size")), "shard_size"),
        (lambda f: _edit_manifest(f, lambda m: m.update(num_samples="ten")), "num_samples"),
        (
            lambda f: _edit_manifest(f, lambda m: m["fields"]["logits"].update(shards="x")),
            "fields.logits.shards",
        ),
        (
            lambda f: _edit_manifest(
                f, lambda m: m["fields"]["logits"]["shards"].__setitem__(0, "/etc/passwd")
            ),
            "outside the cache folder",
        ),  # fmt: skip
        (
            lambda f: _edit_manifest(f, lambda m: m["fields"]["logits"]["shards"].__setitem__(0, "../x.npy")),
            "outside the cache folder",
        ),  # fmt: skip
    ],
)
def test_damaged_cache_is_one_line(cache, damage, message):
    CachedTeacher(cache)  # the intact cache opens
    damage(cache)
    with pytest.raises(AlambicError, match=message) as caught:
        CachedTeacher(cache)
    assert "\n" not in str(caught.value) and str(cache) in str(caught.value)
    assert "cache-teacher" in str(caught.value)


# --------------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("how", ["deflate", "truncated", "not-gzip"])
def test_corrupt_gz_idx_file(tmp_path, how):
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(range(200))
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    packed = gzip.compress(raw * 50)
    if how == "deflate":  # a damaged deflate stream: zlib.error
        packed = packed[:20] + bytes(b ^ 0xFF for b in packed[20:60]) + packed[60:]
    elif how == "truncated":
        packed = packed[: len(packed) // 2]
    else:
        packed = b"not gzip at all" * 4
    path.write_bytes(packed)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        read_idx(path)


def test_custom_factory_that_raises_is_named(setup_dir):
    with pytest.raises(
        DataError, match=r"'alambic_fault_factories:broken' raised FileNotFoundError: no such file"
    ):
        build_datasets("custom", factory="alambic_fault_factories:broken")


@pytest.mark.parametrize(("shift", "num_classes", "bad"), [(0, 2, "label 2"), (-1, 3, "label -1")])
def test_custom_labels_out_of_range(setup_dir, tmp_path, shift, num_classes, bad):
    with pytest.raises(DataError, match=bad):
        build_datasets(
            "custom",
            factory="alambic_fault_factories:blobs",
            factory_kwargs={"label_shift": shift, "num_classes": num_classes},
        )
    result = _run(
        "run",
        setup_dir / "tiny.yaml",
        "--set",
        f"data.factory_kwargs={{label_shift: {shift}, num_classes: {num_classes}}}",
        "--out",
        tmp_path / "run",
    )
    _one_line_error(result, bad, "outside 0..")


# --------------------------------------------------------------------------------------------------
# writes the OS refuses


def _refuse(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    parts = _training_state(tmp_path)
    save_training_state(tmp_path, epoch=0, step=3, **parts)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(checkpoint_module, "save_file", _refuse)
    with pytest.raises(OutputError, match="No space left on device; free some disk space") as caught:
        save_training_state(tmp_path, epoch=1, step=6, **parts)
    assert str(tmp_path / ".ckpt-0001.tmp") in str(caught.value)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing half-written, the old checkpoint intact
    assert load_training_state(latest_checkpoint(tmp_path), **_training_state(tmp_path)) == (0, 3)


def test_full_disk_in_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    monkeypatch.setattr(checkpoint_module.os, "fsync", _refuse)
    with pytest.raises(OutputError, match=f"cannot write {target}"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_full_disk_during_a_run_is_one_line_and_marks_it_failed(setup_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "save_file", _refuse)
    run_dir = tmp_path / "run"
    _one_line_error(
        _run("run", setup_dir / "tiny.yaml", "--out", run_dir), "No space left on device", str(run_dir)
    )
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["error_type"] == "OutputError"


def test_out_that_is_a_file_or_under_a_file(setup_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    _one_line_error(_run("run", setup_dir / "tiny.yaml", "--out", blocker), "is a file")
    _one_line_error(
        _run("run", setup_dir / "tiny.yaml", "--out", blocker / "run"), "Not a directory", str(blocker)
    )
    assert blocker.read_text() == "mine"


def test_unwritable_metrics_is_one_line(setup_dir, tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    run_dir = tmp_path / "run"
    _one_line_error(
        _run("run", setup_dir / "tiny.yaml", "--out", run_dir), str(run_dir / "metrics.jsonl"), "read-only"
    )


# --------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_marks_the_run_interrupted(setup_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(setup_dir)]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "alambic.cli",
        "run",
        str(setup_dir / "tiny.yaml"),
        "--out",
        str(run_dir),
    ]
    long = ["--set", "teacher.train.epochs=100000", "--set", "stages=[teacher]"]
    process = subprocess.Popen(
        [*command, *long], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    latest = run_dir / "teacher" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300  # the first checkpoint takes seconds; a loaded machine gets room
    while not latest.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not latest.is_file():
        process.kill()
        pytest.fail(f"no first checkpoint within 300 s: {process.communicate()[1][-2000:]}")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "stopped by SIGTERM" in stderr and f"--resume {run_dir}" in stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert latest_checkpoint(run_dir / "teacher" / "checkpoints") is not None
    assert not list((run_dir / "teacher" / "checkpoints").glob(".*"))  # no half-written checkpoint
    # the command the message gives is accepted: the stored config.yaml is the config the run started with
    stored = run_dir / "config.yaml"
    prepare_run_dir(load_config(stored), run_dir, resume=True, is_main=True)


# --------------------------------------------------------------------------------------------------
# non-finite metrics


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_in_a_test_input_writes_valid_json_and_says_so(setup_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            str(setup_dir / "tiny.yaml"),
            "--set",
            "data.factory_kwargs={nan_in_test: true}",
            "--out",
            str(run_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert "models.distilled.loss" in summary["non_finite"]
    assert summary["models"]["distilled"]["loss"] is None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    assert "not finite" in " ".join(result.output.split()) and "models.distilled.loss" in result.output


def test_every_json_writer_refuses_bare_nan(tmp_path):
    from alambic.files import dumps_json

    assert _strict_json(dumps_json({"a": [float("nan"), float("inf"), 1.5]})) == {"a": [None, None, 1.5]}
    assert _strict_json(dumps_json({"a": np.float64("nan")})) == {"a": None}  # a float subclass


def test_sigterm_handler_is_restored():
    from alambic.cli import Terminated, stop_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == previous


# --------------------------------------------------------------------------------------------------
# export and compress read a run's weights


def _malicious_header(path: Path) -> None:
    """A safetensors header that claims a tensor far past the file's end."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16)


@pytest.mark.parametrize("how", ["truncated", "empty", "text", "malicious"])
def test_export_and_compress_of_damaged_weights_are_one_line_and_write_nothing(run_copy, how):
    weights = run_copy / "student" / "model.safetensors"
    _malicious_header(weights) if how == "malicious" else _damage(weights, how)
    before = sorted(str(path) for path in run_copy.rglob("*"))
    line = _one_line_error(_run("export", run_copy, "--format", "safetensors"), str(weights), "--resume")
    assert f"alambic run {run_copy / 'config.yaml'} --resume {run_copy}" in line
    _one_line_error(_run("compress", run_copy), str(weights), "--resume")
    assert sorted(str(path) for path in run_copy.rglob("*")) == before  # nothing written


# --------------------------------------------------------------------------------------------------
# metrics.jsonl across a kill


def _metric_keys(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(record["stage"], record["kind"], record["step"]) for record in records]


@pytest.mark.parametrize("saves_before_kill", [2, 3])  # distill killed before its first / after it
def test_metrics_of_an_attempt_killed_before_its_checkpoint_are_not_kept(
    setup_dir, tmp_path, monkeypatch, saves_before_kill
):
    import alambic.core.loop as loop_module

    args = ["run", setup_dir / "tiny.yaml", "--set", "stages=[teacher,distill]"]
    args += ["--set", "teacher.train.epochs=2", "--set", "distill.train.epochs=2"]
    args += ["--set", "distill.train.log_every=1", "--set", "distill.train.eval_every=1"]
    assert _run(*args, "--out", tmp_path / "whole").exit_code == 0
    original, calls = loop_module.save_training_state, {"n": 0}

    def die_at_a_save(*positional, **named):  # the teacher saves twice, then distill after each epoch
        calls["n"] += 1
        if calls["n"] > saves_before_kill:
            raise KeyboardInterrupt  # killed as its checkpoint was about to be written
        return original(*positional, **named)

    monkeypatch.setattr(loop_module, "save_training_state", die_at_a_save)
    assert runner.invoke(app, [str(arg) for arg in [*args, "--out", tmp_path / "killed"]]).exit_code == 130
    monkeypatch.setattr(loop_module, "save_training_state", original)
    killed = _metric_keys(tmp_path / "killed")
    assert [key for key in killed if key[0] == "distill"]  # the killed attempt had logged distill rows
    assert _run(*args, "--resume", tmp_path / "killed").exit_code == 0
    assert _metric_keys(tmp_path / "killed") == _metric_keys(tmp_path / "whole")
