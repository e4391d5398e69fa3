"""The Python API talks back: callbacks (early stopping, best weights, history), progress, the user's own
optimizer and scheduler."""

import json
from pathlib import Path

import pytest
import torch
from tolerance import close
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alambic import (
    BestWeights,
    Callback,
    EarlyStopping,
    History,
    TrainConfig,
    distill,
    load_config,
    train_module,
)
from alambic.core.api import as_terms
from alambic.core.distiller import Distiller, Teacher
from alambic.core.optim import make_accelerator
from alambic.errors import ConfigError
from alambic.run.pipeline import run


def _data(n=128, features=10, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(-1)
    return TensorDataset(inputs, labels)


def _loader(dataset, batch_size=32):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _mlp(hidden, seed, features=10, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _scripted(values):
    """An ``evaluate(student)`` that returns the given accuracies one epoch after the other."""
    remaining = list(values)
    return lambda student: {"accuracy": remaining.pop(0), "loss": 1.0}


def _train(callbacks, evaluations, epochs, **kwargs):
    terms = as_terms(None)
    return train_module(
        Distiller(_mlp(8, 2), terms),
        _loader(_data()),
        TrainConfig(epochs=epochs, optimizer="adamw", lr=1e-2).loop(),
        accelerator=make_accelerator(),
        teacher=Teacher(_mlp(16, 1), terms),
        evaluate=_scripted(evaluations),
        callbacks=callbacks,
        **kwargs,
    )


class Snapshots(Callback):
    """The student's weights (copies) and the metrics after every epoch."""

    def __init__(self):
        self.weights, self.metrics = {}, {}

    def on_epoch_end(self, state, epoch, metrics):
        self.weights[epoch] = {k: v.clone() for k, v in state.student.state_dict().items()}
        self.metrics[epoch] = metrics


def test_early_stopping_stops_when_the_metric_stops_improving():
    stopper, snapshots = EarlyStopping("accuracy", patience=2), Snapshots()
    _train([stopper, snapshots], [0.5, 0.6, 0.6, 0.55, 0.9, 0.9], epochs=6)
    # best at epoch 2 (0.6; max for accuracy); epochs 3 and 4 do not beat it: stopped after 4 of 6
    assert sorted(snapshots.weights) == [1, 2, 3, 4] and stopper.stopped_epoch == 4
    assert stopper.watch.best == 0.6 and stopper.watch.best_epoch == 2


def test_early_stopping_mode_and_min_delta():
    stopper = EarlyStopping("loss", patience=1, min_delta=0.1)
    assert stopper.watch.mode == "min"
    state = type("State", (), {"stop": False})()
    stopper.on_epoch_end(state, 1, {"loss": 1.0})
    stopper.on_epoch_end(state, 2, {"train_total": 0.3})  # not evaluated: not counted
    assert not state.stop
    stopper.on_epoch_end(state, 3, {"loss": 0.95})  # better, but by less than min_delta
    assert state.stop


def test_best_weights_restores_the_best_epochs_student_exactly():
    keep, snapshots = BestWeights("accuracy"), Snapshots()
    student = _train([snapshots, keep], [0.5, 0.9, 0.7, 0.6], epochs=4)
    assert keep.best_epoch == 2
    last, best = snapshots.weights[4], snapshots.weights[2]
    assert any(not torch.equal(last[k], best[k]) for k in best)  # it trained on after epoch 2
    for key, value in student.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert all(value.device.type == "cpu" for value in keep.weights.values())


def test_a_monitor_without_an_evaluation_or_unknown_is_one_line():
    with pytest.raises(ConfigError, match="nothing is evaluated"):
        distill(
            _mlp(16, 1), _mlp(8, 2), _loader(_data()), callbacks=[EarlyStopping("accuracy")], progress=False
        )
    with pytest.raises(ConfigError, match="'acc' is not a metric of this run; it has: accuracy"):
        _train([BestWeights("acc")], [0.5], epochs=1)
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping("accuracy", patience=0)


def test_history_keeps_train_losses_without_evaluation_and_matches_the_log(tmp_path):
    def run(**kwargs):
        return distill(_mlp(16, 1), _mlp(8, 2), _loader(_data()), epochs=3, progress=False, **kwargs)

    run(run_dir=tmp_path, log_every=1)  # every step's losses in metrics.jsonl
    student, history = run(log_every=3, return_history=True)  # 4 steps an epoch: means of 3 and of 1 step
    assert isinstance(student, nn.Module) and isinstance(history, History)
    assert [record["epoch"] for record in history.records] == [1, 2, 3]
    assert set(history.records[0]) == {"epoch", "train_total", "train_ce", "train_kd"}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for epoch, mean in history["train_total"]:
        steps = [r["losses"]["total"] for r in records if r["kind"] == "train" and r["epoch"] == epoch]
        expected = torch.tensor(sum(steps) / len(steps))
        torch.testing.assert_close(torch.tensor(mean), expected, **close(expected))


def test_history_holds_the_evaluations_and_metrics_jsonl_is_unchanged(tmp_path):
    dataset = _data()
    history = History()
    distill(
        _mlp(16, 1), _mlp(8, 2), _loader(dataset), epochs=2, eval_loader=_loader(dataset), num_classes=3,
        run_dir=tmp_path, callbacks=[history], progress=False,
    )  # fmt: skip
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert set(evals[0]) == {"stage", "kind", "epoch", "step", "accuracy", "macro_f1", "loss"}
    assert [(r["epoch"], r["accuracy"]) for r in evals] == history["accuracy"]


def test_early_stopping_from_settings_checkpoints_and_a_resumed_stopped_run_is_done(tmp_path):
    dataset = _data()
    frozen = lambda params: torch.optim.SGD(params, lr=0.0)  # noqa: E731  nothing improves
    common = dict(
        eval_loader=_loader(dataset), num_classes=3, run_dir=tmp_path, optimizer=frozen,
        early_stopping={"monitor": "accuracy", "patience": 2}, keep_best="accuracy", return_history=True,
        progress=False,
    )  # fmt: skip
    student, history = distill(_mlp(16, 1), _mlp(8, 2), _loader(dataset), epochs=10, **common)
    assert [record["epoch"] for record in history.records] == [1, 2, 3]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["epoch"] == 2
    resumed, resumed_history = distill(_mlp(16, 1), _mlp(8, 9), _loader(dataset), epochs=10, **common)
    assert resumed_history.records == history.records  # restored from the checkpoint, no epoch run
    for key, value in student.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_progress_false_prints_nothing_and_true_prints_one_line_per_epoch(capsys):
    distill(_mlp(16, 1), _mlp(8, 2), _loader(_data()), epochs=2, progress=False)
    assert capsys.readouterr().out == ""
    distill(_mlp(16, 1), _mlp(8, 2), _loader(_data()), epochs=2, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("distill epoch 2/2 step 8 train_total ")


def _one_cycle(opt, total_steps=8):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total_steps)


def test_the_users_optimizer_and_scheduler_are_used_and_stepped_per_step(tmp_path):
    class Rates(Callback):
        def __init__(self):
            self.rates, self.optimizers = [], set()

        def on_step_end(self, state):
            self.rates.append(state.scheduler.get_last_lr()[0])
            self.optimizers.add(type(state.scheduler.optimizer).__name__)

    rates = Rates()
    distill(
        _mlp(16, 1), _mlp(8, 2), _loader(_data()), epochs=2, progress=False, callbacks=[rates],
        optimizer=lambda params: torch.optim.Adam(params, lr=0.1), scheduler=_one_cycle,
    )  # fmt: skip
    reference = _one_cycle(torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1))
    expected = []
    for _ in range(8):  # 4 batches a epoch, 2 epochs
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert rates.optimizers == {"Adam"} and rates.rates == expected


def test_a_user_scheduler_resumes(tmp_path, monkeypatch):
    class DieAtEpoch2(Callback):
        def on_epoch_end(self, state, epoch, metrics):
            if epoch == 2:
                raise KeyboardInterrupt  # before epoch 2's checkpoint: epoch 1's is the latest

    common = dict(
        epochs=3, progress=False, log_every=1, scheduler=lambda opt: _one_cycle(opt, total_steps=12),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    )  # fmt: skip
    whole = distill(_mlp(16, 1), _mlp(8, 2), _loader(_data()), run_dir=tmp_path / "a", **common)
    with pytest.raises(KeyboardInterrupt):
        distill(
            _mlp(16, 1),
            _mlp(8, 2),
            _loader(_data()),
            run_dir=tmp_path / "b",
            callbacks=[DieAtEpoch2()],
            **common,
        )
    resumed = distill(_mlp(16, 1), _mlp(8, 2), _loader(_data()), run_dir=tmp_path / "b", **common)

    def read(run):
        return [
            json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]

    assert len(read("a")) == 12 and read("b") == read("a")
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, **close(value))


def test_wrong_optimizer_and_scheduler_types_are_one_line_errors():
    run = lambda **kwargs: distill(_mlp(16, 1), _mlp(8, 2), _loader(_data()), progress=False, **kwargs)  # noqa: E731
    student = _mlp(8, 2)
    with pytest.raises(ConfigError, match="got a SGD .*optimizer=lambda params"):
        run(optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="returned a list, not a torch.optim.Optimizer"):
        run(optimizer=lambda params: params)
    with pytest.raises(ConfigError, match="must optimize the parameters it is given"):
        run(optimizer=lambda params: torch.optim.SGD(student.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="lr: set them in your optimizer function"):
        run(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), lr=0.1)
    with pytest.raises(ConfigError, match="scheduler must be a function of the optimizer, got str"):
        run(scheduler="cosine")
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        run(scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ConfigError, match="invalid training setting: early_stopping.patience"):
        run(early_stopping={"monitor": "accuracy", "patience": 0})


@pytest.mark.slow  # a whole (tiny) run: about 5 s
def test_a_run_config_stops_early_keeps_the_best_and_says_so_in_its_summary(tmp_path):
    root = Path(__file__).resolve().parent.parent
    config = load_config(
        root / "recipes" / "digits.yaml",
        [
            "teacher.train.epochs=1",
            "distill.train.epochs=6",
            "stages=[teacher, distill, evaluate]",
            # nothing beats the first evaluation by a whole unit of accuracy: stopped after epoch 2
            "distill.train.early_stopping={monitor: accuracy, patience: 1, min_delta: 1.0}",
            "distill.train.keep_best=accuracy",
        ],
    )
    summary = json.loads((run(config, run_dir=tmp_path / "run") / "summary.json").read_text())
    stopping = summary["stages_stopping"]["distill"]
    assert stopping["early_stopping"] == {"monitor": "accuracy", "stopped_epoch": 2}
    assert stopping["keep_best"]["monitor"] == "accuracy" and stopping["keep_best"]["epoch"] in (1, 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in records if r["stage"] == "distill") == 2
