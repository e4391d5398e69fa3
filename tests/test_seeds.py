"""Several seeds: the baseline and distill stages once per seed, mean ± standard deviation, and a resume that
trains only the seeds not done."""

import json
import os
import statistics

import pytest
import torch
from safetensors.torch import load_file
from tolerance import close

import alambic.run.stages as stages_module
from alambic.config import load_config
from alambic.errors import ConfigError
from alambic.run.pipeline import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "teacher.model.kwargs.hidden=[32]",
    "teacher.train.epochs=1",
    "distill.train.epochs=1",
    "student.model.kwargs.hidden=[8]",
    "evaluate.latency_repeats=1",
    "evaluate.batch_sizes=[1]",
    "seeds=[0, 1]",
]


def test_two_seeds_give_mean_std_n_and_a_resume_trains_only_the_missing_seed(tmp_path, monkeypatch):
    config = load_config(os.path.join(ROOT, "recipes", "digits.yaml"), TINY)
    run_dir = run(config, run_dir=tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    models = summary["models"]
    assert set(models) == {"teacher", "baseline", "distilled", "baseline-seed1", "distilled-seed1"}
    stats = summary["seeds"]["models"]["distilled"]["accuracy"]
    values = [models["distilled"]["accuracy"], models["distilled-seed1"]["accuracy"]]
    assert stats["n"] == 2 and summary["seeds"]["seeds"] == [0, 1]
    assert abs(stats["mean"] - statistics.fmean(values)) < 1e-12
    assert abs(stats["std"] - statistics.stdev(values)) < 1e-12
    first = load_file(run_dir / "student" / "model.safetensors")
    second = load_file(run_dir / "student-seed1" / "model.safetensors")
    assert any(not torch.equal(first[key], second[key]) for key in first)  # another seed, other weights
    report = (run_dir / "report.md").read_text()
    assert "Over seeds [0, 1]" in report and "| distilled | 2 | " in report and " ± " in report

    # interrupted before the second seed's distillation finished: only that stage trains again
    (run_dir / "student-seed1" / "model.safetensors").unlink()
    (run_dir / "summary.json").unlink()
    trained = []
    train_stage = stages_module.train_stage
    monkeypatch.setattr(
        stages_module,
        "train_stage",
        lambda context, stage, *a, **k: trained.append(stage) or train_stage(context, stage, *a, **k),
    )
    run(config, run_dir=run_dir, resume=True)
    assert trained == ["distill-seed1"]
    again = load_file(run_dir / "student-seed1" / "model.safetensors")
    for key, value in second.items():
        torch.testing.assert_close(again[key], value, **close(value))
    assert (
        json.loads((run_dir / "summary.json").read_text())["seeds"]["models"]["distilled"]["accuracy"]["n"]
        == 2
    )


def test_seeds_must_be_distinct():
    with pytest.raises(ConfigError, match="repeat a seed"):
        load_config(os.path.join(ROOT, "recipes", "digits.yaml"), ["seeds=[1, 1]"])
