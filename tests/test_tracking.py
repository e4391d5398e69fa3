"""Experiment trackers through Accelerate: the config, one-line errors, and the files TensorBoard, W&B
(offline) and MLflow (a local file store) write: train losses, lr, eval metrics and the eval loss, one
tracker run per stage."""

import glob
import math
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import alambic.core.monitor as monitor
from alambic import distill
from alambic.config import TRACKERS, TrackingConfig, config_from_dict
from alambic.core.monitor import MetricsLog, Trackers, check_trackers_installed
from alambic.core.optim import make_accelerator
from alambic.errors import ConfigError

RECORDS = [
    {
        "stage": "teacher",
        "kind": "train",
        "epoch": 1,
        "step": 2,
        "lr": 0.1,
        "losses": {"total": 1.5, "ce": 1.5},
    },
    {"stage": "teacher", "kind": "eval", "epoch": 1, "step": 2, "accuracy": 0.5, "loss": 1.25},
    {"stage": "distill", "kind": "train", "epoch": 1, "step": 2, "lr": 0.2, "losses": {"total": 0.75}},
    {"stage": "distill", "kind": "eval", "epoch": 1, "step": 2, "accuracy": 0.625, "loss": 0.5},
]


def _log_records(tmp_path, trackers: list[str]) -> None:
    accelerator = make_accelerator(log_with=trackers, logging_dir=tmp_path / "tracking")
    tracking = TrackingConfig(trackers=trackers)
    stage_runs = Trackers(
        accelerator, tracking, project="proj", run_name="run", logging_dir=tmp_path / "tracking",
        config={"distill": {"train": {"lr": 0.2, "milestones": [1, 2]}}},
    )  # fmt: skip
    with MetricsLog(tmp_path / "metrics.jsonl", trackers=stage_runs) as log:
        for record in RECORDS:
            log.write(record)
    assert not accelerator.trackers  # every stage's tracker run is finished


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tracking_config_shorthand_and_one_line_errors():
    assert TrackingConfig.model_validate(["tensorboard", "wandb"]).trackers == ["tensorboard", "wandb"]
    assert TrackingConfig.model_validate("mlflow").trackers == ["mlflow"]
    assert {"tensorboard", "wandb", "mlflow"} <= set(TRACKERS)
    base = {"student": {"model": {"arch": "mlp"}}, "teacher": {"model": {"arch": "mlp"}, "train": {}}}
    assert config_from_dict({**base, "tensorboard": True}).tracking.trackers == ["tensorboard"]
    with pytest.raises(
        ConfigError, match=r"tracking.trackers: unknown tracker 'tensorbord': choose from .*wandb"
    ):
        config_from_dict({**base, "tracking": ["tensorbord"]})
    with pytest.raises(ConfigError, match="init_kwargs for 'wandb', which is not in trackers"):
        config_from_dict({**base, "tracking": {"trackers": ["mlflow"], "init_kwargs": {"wandb": {}}}})
    loader = DataLoader(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), batch_size=2)
    with pytest.raises(ConfigError, match="tracking: trackers: unknown tracker 'tb'"):
        distill(None, torch.nn.Linear(3, 2), loader, terms=[{"loss": "ce"}], tracking=["tb"])


def test_a_missing_tracker_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(monitor, "get_available_trackers", lambda: ["tensorboard"])
    check_trackers_installed(["tensorboard"])
    with pytest.raises(
        ConfigError, match="tracking with mlflow needs the mlflow-skinny package.*pip install mlflow-skinny"
    ):
        check_trackers_installed(["tensorboard", "mlflow"])


def test_tensorboard_one_run_per_stage_through_accelerate(tmp_path):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is an optional extra: pip install alambic[tensorboard]"
    )
    _log_records(tmp_path, ["tensorboard"])
    teacher = _scalars(tmp_path / "tracking" / "teacher" / "proj")
    distilled = _scalars(tmp_path / "tracking" / "distill" / "proj")
    assert teacher["train/total"] == [(2, 1.5)] and teacher["eval/loss"] == [(2, 1.25)]
    assert set(teacher) == {"train/total", "train/ce", "train/lr", "eval/accuracy", "eval/loss", "epoch"}
    assert distilled["eval/loss"] == [(2, 0.5)] and distilled["train/lr"][0][1] == pytest.approx(0.2)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == len(RECORDS)  # kept as it was


def test_distill_logs_train_losses_and_eval_loss_to_tensorboard(tmp_path):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is an optional extra: pip install alambic[tensorboard]"
    )
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    distill(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), loader, epochs=2, eval_loader=loader, num_classes=3,
            run_dir=tmp_path, log_every=2, tracking={"trackers": ["tensorboard"], "project": "p"})  # fmt: skip
    scalars = _scalars(tmp_path / "tracking" / "distill" / "p")
    assert [step for step, _ in scalars["train/total"]] == [2, 4, 6, 8]
    assert {"train/kd", "train/ce", "train/lr", "eval/accuracy", "eval/macro_f1"} <= set(scalars)
    assert [step for step, _ in scalars["eval/loss"]] == [4, 8]
    assert all(math.isfinite(value) and value > 0 for _, value in scalars["eval/loss"])


@pytest.mark.slow
def test_wandb_offline_writes_one_run_per_stage_under_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is an optional extra: pip install alambic[tracking]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_records(tmp_path, ["wandb"])
    for stage in ("teacher", "distill"):
        (record_file,) = glob.glob(
            str(tmp_path / "tracking" / stage / "wandb" / "offline-run-*" / "run-*.wandb")
        )
        # the run's records (protobuf: names and keys in plain bytes); W&B's service process may still be
        # writing the last run's file when finish() returns on a loaded machine: wait for it a little
        deadline = time.monotonic() + 60
        while b"eval/loss" not in (data := Path(record_file).read_bytes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for text in (
            f"run/{stage}",
            "train/total",
            "train/lr",
            "eval/accuracy",
            "eval/loss",
            "distill.train.lr",
        ):
            assert text.encode() in data, (stage, text)


@pytest.mark.slow
def test_mlflow_local_file_store_one_run_per_stage(tmp_path, monkeypatch):
    mlflow = pytest.importorskip(
        "mlflow", reason="MLflow is an optional extra: pip install alambic[tracking]"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv(
        "MLFLOW_ALLOW_FILE_STORE", "true"
    )  # MLflow 3 prefers a database; a folder suffices here
    _log_records(tmp_path, ["mlflow"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert set(by_name) == {"run/teacher", "run/distill"}
    teacher, distilled = by_name["run/teacher"], by_name["run/distill"]
    assert teacher.data.metrics["eval/loss"] == 1.25 and distilled.data.metrics["eval/loss"] == 0.5
    assert teacher.data.metrics["train/total"] == 1.5 and distilled.data.metrics["train/lr"] == 0.2
    assert distilled.data.params["distill.train.milestones"] == "[1, 2]"
    assert distilled.data.tags["alambic.stage"] == "distill"
    assert [m.step for m in client.get_metric_history(distilled.info.run_id, "eval/accuracy")] == [2]
