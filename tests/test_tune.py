"""alambic tune: a resumable Optuna study over the distill stage, and the budget-driven student search."""

import json
from pathlib import Path

import pytest

from alambic.config import load_config
from alambic.errors import ConfigError

optuna = pytest.importorskip("optuna", reason="alambic tune needs optuna (pip install alambic[tune])")

from alambic.run import tune as tune_module  # noqa: E402
from alambic.run.tune import tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["teacher.train.epochs=1", "distill.train.epochs=2", "teacher.model.kwargs.hidden=[64]"]


def _config(*extra):
    return load_config(ROOT / "recipes" / "digits.yaml", [*TINY, *extra])


def test_a_killed_search_resumes_with_its_earlier_trials(tmp_path, monkeypatch):
    study_dir = tmp_path / "study"
    first = tune(_config(), trials=2, study_dir=study_dir, methods=["kd", "dist"])
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "COMPLETE"]
    earlier = {t["number"]: t["params"] for t in first["trials"]}
    teacher_file = study_dir / "teacher.safetensors"
    teacher_bytes = teacher_file.read_bytes()
    # a kill (SIGKILL) mid-trial leaves that trial RUNNING in the SQLite study
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{study_dir / 'study.db'}")
    killed = study.ask()
    assert killed.number == 2
    # the same command again: the teacher is reused (not trained again) and the study goes on to 3 trials
    trained_stages = []
    original_fit = tune_module.train_module

    def counting_fit(*args, **kwargs):
        trained_stages.append(kwargs.get("stage"))
        return original_fit(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train_module", counting_fit)
    second = tune(_config(), trials=3, study_dir=study_dir, methods=["kd", "dist"])
    states = {t["number"]: t["state"] for t in second["trials"]}
    assert {n: states[n] for n in (0, 1, 2)} == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL"}
    assert states[3] in ("COMPLETE", "PRUNED") and len(states) == 4  # finished: the median pruner may stop it
    assert {t["number"]: t["params"] for t in second["trials"] if t["number"] < 2} == earlier
    assert trained_stages == ["trial_3"] and teacher_file.read_bytes() == teacher_bytes
    best = load_config(second["best_config"])  # best.yaml runs as a config
    assert best.distill.terms[1].loss == second["best_params"]["method"]
    assert best.distill.train.lr == pytest.approx(second["best_params"]["lr"])
    assert json.loads((study_dir / "trials.json").read_text())[3]["state"] == states[3]
    # enough trials already: nothing runs
    trained_stages.clear()
    tune(_config(), trials=3, study_dir=study_dir, methods=["kd", "dist"])
    assert trained_stages == []


def test_a_study_resumes_only_with_its_own_settings(tmp_path):
    tune(_config(), trials=1, study_dir=tmp_path / "s", methods=["kd"])
    with pytest.raises(ConfigError, match="other settings"):
        tune(_config("distill.train.epochs=3"), trials=2, study_dir=tmp_path / "s", methods=["kd"])


def test_budget_mode_discards_students_over_the_limit_before_training(tmp_path, monkeypatch):
    trained = []
    original_fit = tune_module.train_module

    def counting_fit(*args, **kwargs):
        trained.append(
            sum(p.numel() for p in args[0].student.parameters()) if kwargs.get("stage") != "teacher" else 0
        )
        return original_fit(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train_module", counting_fit)
    limit_mb = 0.02  # 20 kB: a 64-input MLP with one hidden layer of at most 64 units (float32)
    result = tune(_config(), trials=6, study_dir=tmp_path / "b", methods=["kd"], max_size_mb=limit_mb)
    rejected = [t for t in result["trials"] if "over_budget" in t]
    kept = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert rejected and all(t["state"] == "PRUNED" for t in rejected)
    assert len(trained) == 1 + len(kept)  # the teacher, then only the students under the limit
    for students_params in trained[1:]:
        assert students_params * 4 / 1e6 < limit_mb
    for trial in rejected:
        hidden = trial["student"]["kwargs"]["hidden"]
        assert (
            64 * hidden[0] + sum(a * b for a, b in zip(hidden, hidden[1:])) + hidden[-1] * 10
        ) * 4 / 1e6 > limit_mb * 0.9


def test_tune_refuses_what_it_cannot_search(tmp_path):
    with pytest.raises(ConfigError, match="temperature"):
        tune(_config(), trials=1, study_dir=tmp_path / "x", methods=["fitnet"])
    with pytest.raises(ConfigError, match="mlp and cnn"):
        tune(_config("student.model.arch=resnet20"), trials=1, study_dir=tmp_path / "y", max_size_mb=1.0)


def test_the_tune_command_prints_the_trials_and_writes_best_yaml(tmp_path):
    from typer.testing import CliRunner

    from alambic.cli import app

    args = ["tune", str(ROOT / "recipes" / "digits.yaml"), "--trials", "1", "--study", str(tmp_path / "c")]
    args += [item for override in TINY for item in ("--set", override)]
    result = CliRunner().invoke(app, [*args, "--methods", "kd"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "best.yaml").is_file() and "best.yaml" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--methods", "nope"])
    assert result.exit_code == 2 and "nope" in result.output
