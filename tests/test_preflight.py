"""Every mistake that can be found without training is found before anything trains.

Each malformed config or override must end with exit code 2, one line (no traceback), and no run
directory; a corrected config continues a run without retraining the stages it had finished.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alambic.cli import app

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "recipes" / "digits.yaml")
TINY = ["teacher.train.epochs=1", "distill.train.epochs=1", "evaluate.latency_repeats=1"]
runner = CliRunner()

# (id, overrides): each one alone is an ordinary user mistake
MALFORMED = [
    ("unknown-dataset", ["data.dataset=digitz"]),
    ("missing-data-dir", ["data.dataset=mnist", "data.data_dir=/nonexistent/mnist"]),
    ("dropout-out-of-range", ["student.model.kwargs.dropout=2"]),
    ("teacher-dropout-out-of-range", ["teacher.model.kwargs.dropout=-1"]),
    ("missing-teacher-checkpoint", ["teacher.model.checkpoint=/nonexistent/teacher.safetensors"]),
    ("missing-student-checkpoint", ["student.model.checkpoint=/nonexistent/student.safetensors"]),
    ("unknown-student-arch", ["student.model.arch=mlpp"]),
    ("unknown-teacher-arch", ["teacher.model.arch=resnet2000"]),
    ("student-kwargs-typo", ["student.model.kwargs.hiden=[8]"]),
    ("student-kwargs-wrong-type", ["student.model.kwargs.hidden=eight"]),
    ("num-classes-mismatch", ["student.model.kwargs.num_classes=5"]),
    ("teacher-num-classes-mismatch", ["teacher.model.kwargs.num_classes=3"]),
    ("image-model-on-flat-data", ["student.model.arch=resnet20", "student.model.kwargs={}"]),
    ("feature-path-missing", ["distill.terms=[{loss: fitnet, student: hidden.7, teacher: hidden.1}]"]),
    ("teacher-feature-path-missing", ["distill.terms=[{loss: fitnet, student: hidden.0, teacher: hiddn.1}]"]),
    (
        "feature-path-typo-list",
        ["distill.terms=[{loss: fsp, student: [hidden.0, hidden.9], teacher: [hidden.0, hidden.1]}]"],
    ),
    ("empty-distill-terms", ["distill.terms=[]"]),
    ("empty-baseline-terms", ["baseline.terms=[]"]),
    ("weight-nan", ["distill.terms.1.weight=.nan"]),
    ("weight-inf", ["distill.terms.0.weight=.inf"]),
    ("lr-inf", ["distill.train.lr=.inf"]),
    ("lr-nan", ["teacher.train.lr=.nan"]),
    ("lr-negative", ["distill.train.lr=-0.1"]),
    ("seed-negative", ["seed=-1"]),
    ("seed-huge", ["seed=1e20"]),
    ("seed-text", ["seed=zero"]),
    ("temperature-list", ["distill.terms.1.params.temperature=[1, 2]"]),
    ("temperature-text", ["distill.terms.1.params.temperature=warm"]),
    ("temperature-zero", ["distill.terms.1.params.temperature=0"]),
    ("param-nan", ["distill.terms.1.params.temperature=.nan"]),
    ("unknown-loss", ["distill.terms.1.loss=kdd"]),
    ("unknown-loss-param", ["distill.terms.1.params.temprature=4"]),
    ("eval-batch-size-zero", ["evaluate.batch_sizes=[0]"]),
    ("eval-batch-sizes-empty", ["evaluate.batch_sizes=[]"]),
    ("latency-repeats-zero", ["evaluate.latency_repeats=0"]),
    ("latency-threads-zero", ["evaluate.latency_threads=0"]),
    ("group-by-length-without-tokens", ["data.group_by_length=true"]),
    ("cuda-graphs-with-dynamic-padding", ["data.dynamic_padding=true", "distill.train.cuda_graphs=true"]),
    ("epochs-zero", ["distill.train.epochs=0"]),
    ("batch-size-zero", ["teacher.train.batch_size=0"]),
    ("train-subset-zero", ["data.train_subset=0"]),
    ("test-fraction-one", ["data.test_fraction=1"]),
    ("unknown-key", ["distill.train.lrr=0.1"]),
    ("unknown-top-level-key", ["stagez=[teacher]"]),
    ("unknown-stage", ["stages=[teacher, distil]"]),
    ("bad-precision", ["precision=fp8"]),
    ("bad-optimizer", ["distill.train.optimizer=adam"]),
    ("step-without-milestones", ["distill.train.schedule=step"]),
    ("momentum-one", ["distill.train.momentum=1"]),
    ("bad-teacher-dtype", ["distill.teacher_dtype=int4"]),
    ("missing-teacher-cache", ["distill.teacher_cache=/nonexistent/cache"]),
    ("distill-without-teacher", ["stages=[baseline, distill, evaluate]"]),
    ("override-path-into-scalar", ["seed.value=1"]),
    ("override-index-out-of-range", ["distill.terms.5.weight=1"]),
    ("override-without-equals", ["distill.train.lr"]),
    ("custom-factory-missing", ["data.dataset=custom", "data.factory=nowhere.module:make"]),
    ("hf-teacher-missing", ["teacher.model.arch=hf:/nonexistent/model", "teacher.model.kwargs={}"]),
    ("derive-from-zoo-teacher", ["student.model.arch=derive:teacher", "student.model.kwargs={layers: 1}"]),
    ("crd-without-labels-path", ["distill.terms=[{loss: crd, student: hidden.0, teacher: nowhere}]"]),
    (
        "self-distill-exit-missing",
        ["strategy={kind: self_distill, exits: [hidden.9]}", "distill.terms=[{loss: ce}]"],
    ),
    ("mutual-peer-bad-kwargs", ["strategy={kind: mutual, peers: [{arch: mlp, kwargs: {hidden: [0]}}]}"]),
    (
        "ensemble-member-checkpoint-missing",
        [
            "teacher=null",
            "strategy={kind: ensemble, teachers: [{arch: mlp, checkpoint: /nonexistent/a.safetensors}, "
            "{arch: mlp, checkpoint: /nonexistent/b.safetensors}]}",
        ],
    ),
    ("assistant-unknown-arch", ["strategy={kind: assistants, assistants: [{arch: mlq}]}"]),
    ("mix-with-cache", ["distill.train.mix=mixup", "distill.teacher_cache=/tmp"]),
    ("augment-without-data-augment", ["distill.train.augment=true"]),
]


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize("overrides", [case[1] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_config_fails_in_one_line_before_the_run_directory_exists(tmp_path, overrides):
    run_dir = tmp_path / "runs" / "bad"
    sets = [item for override in [*TINY, *overrides] for item in ("--set", override)]
    result = runner.invoke(app, ["run", DIGITS, *sets, "--out", str(run_dir)], catch_exceptions=False)
    _one_line_exit_2(result)
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(Path(DIGITS).read_bytes() + "# caf\xe9\n".encode("latin-1"))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert "UTF-8" in _one_line_exit_2(result)
    assert not (tmp_path / "run").exists()


def test_the_error_names_what_to_fix(tmp_path):
    """Spot checks that the one line says what was wrong (not only that something was)."""
    expected = {
        "student.model.kwargs.dropout=2": "dropout",
        "distill.terms.1.weight=.nan": "weight",
        "seed=-1": "seed",
        "evaluate.batch_sizes=[0]": "batch_sizes",
        "distill.terms=[{loss: fitnet, student: hidden.7, teacher: hidden.1}]": "hidden.7",
        "teacher.model.checkpoint=/nonexistent/teacher.safetensors": "/nonexistent/teacher.safetensors",
        "data.group_by_length=true": "set data.group_by_length: false",  # digits rows have no attention mask
    }
    for override, words in expected.items():
        result = runner.invoke(
            app, ["run", DIGITS, "--set", override, "--out", str(tmp_path / "r")], catch_exceptions=False
        )
        assert words in _one_line_exit_2(result), (override, result.output)


def _stage_mtimes(run_dir: Path) -> dict[str, int]:
    return {
        folder: (run_dir / folder / "model.safetensors").stat().st_mtime_ns
        for folder in ("teacher", "baseline", "student")
        if (run_dir / folder / "model.safetensors").is_file()
    }


def test_a_corrected_config_continues_the_run_without_retraining_finished_stages(tmp_path):
    run_dir = tmp_path / "run"
    sets = [item for override in TINY for item in ("--set", override)]
    # the run stops after its teacher and baseline (as if distill had failed at run time)
    first = runner.invoke(
        app,
        ["run", DIGITS, *sets, "--set", "stages=[teacher, baseline]", "--out", str(run_dir)],
        catch_exceptions=False,
    )
    assert first.exit_code == 0, first.output
    before = _stage_mtimes(run_dir)
    assert set(before) == {"teacher", "baseline"}
    # the corrected config changes what had not trained yet (the distill terms) and what never trains
    fixed = [
        "--set", "stages=[teacher, baseline, distill, evaluate]",
        "--set", "distill.terms.1.params.temperature=2",
        "--set", "evaluate.latency_repeats=2",
    ]  # fmt: skip
    second = runner.invoke(
        app, ["run", DIGITS, *sets, *fixed, "--resume", str(run_dir)], catch_exceptions=False
    )
    assert second.exit_code == 0, second.output
    after = _stage_mtimes(run_dir)
    assert after["teacher"] == before["teacher"] and after["baseline"] == before["baseline"]
    assert "student" in after
    stored = (run_dir / "config.yaml").read_text()
    assert "temperature: 2" in stored
    assert len(list(run_dir.glob("config.before-*.yaml"))) == 1  # the previous config is kept
    teacher_rows = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["stage"] == "teacher"
    ]  # fmt: skip
    assert len({row["step"] for row in teacher_rows}) == len(teacher_rows)  # the teacher was not logged twice


def test_a_resume_that_changes_a_finished_stage_is_refused_and_keeps_the_run(tmp_path):
    run_dir = tmp_path / "run"
    sets = [item for override in TINY for item in ("--set", override)]
    first = runner.invoke(
        app,
        ["run", DIGITS, *sets, "--set", "stages=[teacher]", "--out", str(run_dir)],
        catch_exceptions=False,
    )
    assert first.exit_code == 0, first.output
    config_before = (run_dir / "config.yaml").read_text()
    before = _stage_mtimes(run_dir)
    changed = runner.invoke(
        app,
        ["run", DIGITS, *sets, "--set", "teacher.train.lr=0.01", "--resume", str(run_dir)],
        catch_exceptions=False,
    )
    line = _one_line_exit_2(changed)
    assert "teacher" in line and "teacher.train.lr: 0.001 -> 0.01" in line, line
    assert (run_dir / "config.yaml").read_text() == config_before
    assert _stage_mtimes(run_dir) == before
    # the seed decides every stage's initialisation: changing it is refused as well
    reseeded = runner.invoke(
        app, ["run", DIGITS, *sets, "--set", "seed=3", "--resume", str(run_dir)], catch_exceptions=False
    )
    assert "seed: 0 -> 3" in _one_line_exit_2(reseeded)
