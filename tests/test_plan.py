"""A run's plan (alambic.run.plan, alambic.run.planners): one list of stages that the pipeline executes,
the pre-flight probes and --resume reads, so that none of them can drift from the others."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alambic.config import Term, load_config
from alambic.config.strategies import STRATEGIES
from alambic.errors import ConfigError
from alambic.run import plan as plan_module
from alambic.run.pipeline import run
from alambic.run.plan import distill_stage, settings_of_folders
from alambic.run.planners import plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "src" / "alambic" / "recipes").rglob("*.yaml"))
TINY = [
    "teacher.train.epochs=1",
    "distill.train.epochs=1",
    "evaluate.latency_repeats=1",
    "evaluate.batch_sizes=[1]",
    "stages=[teacher, baseline, distill, evaluate]",
]


def test_every_strategy_kind_has_a_planner():
    for kind in [None, *STRATEGIES]:
        assert callable(plan_module._PLANNERS[kind]), kind


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: str(path.relative_to(path.parents[1])))
def test_every_packaged_recipe_plans_stages_that_refer_only_to_earlier_ones(recipe):
    stages = plan(load_config(recipe))
    names = [stage.model for stage in stages]
    folders = [folder for stage in stages for folder in stage.folders]
    assert len(set(names)) == len(names) and len(set(folders)) == len(folders)
    for index, stage in enumerate(stages):
        assert stage.teacher is None or stage.teacher in names[:index], (stage.name, stage.teacher)
        assert stage.settings in ("teacher", "baseline", "distill")
    assert set(settings_of_folders(stages)) == set(folders)


def test_a_strategy_plan_names_each_stage_its_teacher():
    stages = plan(load_config(ROOT / "recipes" / "strategies" / "born-again.yaml"))
    taught = [(stage.name, stage.teacher) for stage in stages if stage.teacher is not None]
    assert taught == [
        ("generation_1", "teacher"),
        ("generation_2", "generation_1"),
        ("distill", "generation_2"),
    ]


def _with_extra_stage(monkeypatch, terms):
    """Plain KD's planner, with one more distill stage (folder ``student_again``) after the others."""
    original = plan_module._PLANNERS[None]

    def extended(config):
        extra = distill_stage(
            config, name="distill_again", model="again", folder="student_again", terms=terms
        )
        return [*original(config), extra]

    monkeypatch.setitem(plan_module._PLANNERS, None, extended)


def test_the_pipeline_executes_a_stage_the_plan_adds(tmp_path, monkeypatch):
    _with_extra_stage(monkeypatch, [Term(loss="ce", weight=0.5), Term(loss="kd", weight=0.5)])
    run_dir = run(load_config(ROOT / "recipes" / "digits.yaml", TINY), run_dir=tmp_path / "run")
    assert load_file(str(run_dir / "student_again" / "model.safetensors"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["models"]) == ["teacher", "baseline", "distilled", "again"]
    assert summary["models"]["again"]["architecture"] == "mlp"
    assert "distill_again" in summary["stages_seconds"]


def test_the_preflight_probes_the_stages_the_plan_adds(tmp_path, monkeypatch):
    # a term that compares a module the student does not have: refused before the run directory exists
    _with_extra_stage(monkeypatch, [Term(loss="fitnet", student="no_such_module", teacher="logits")])
    with pytest.raises(ConfigError, match="no_such_module"):
        run(load_config(ROOT / "recipes" / "digits.yaml", TINY), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stage_a_later_one_needs_is_refused_before_the_run_directory(tmp_path):
    config = load_config(ROOT / "recipes" / "digits.yaml", [*TINY, "stages=[baseline, distill]"])
    with pytest.raises(ConfigError, match="distill and evaluate need a teacher"):
        run(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_finds_every_model_the_plan_saves():
    from alambic.run.artifacts import run_model_source

    mutual = load_config(ROOT / "recipes" / "strategies" / "mutual.yaml")
    folder, model_config = run_model_source(mutual, "peer_1")
    assert folder == "peer_1" and model_config == mutual.strategy.peers[0]
    born_again = load_config(ROOT / "recipes" / "strategies" / "born-again.yaml")
    assert run_model_source(born_again, "generation_1") == ("generation_1", born_again.student.model)
    assert run_model_source(born_again, "student") == ("student", born_again.student.model)
    assert run_model_source(born_again, "teacher") == ("teacher", born_again.teacher.model)
    with pytest.raises(ConfigError, match="must be one of student, teacher, baseline, generation_1"):
        run_model_source(born_again, "peer_1")


def test_the_report_labels_each_stage_s_terms_with_its_own_weights():
    from alambic.run.plan import describe
    from alambic.run.report import stage_weights

    config = load_config(ROOT / "recipes" / "strategies" / "born-again.yaml")
    weights = stage_weights({"plan": describe(plan(config))})
    distill = {term.name: term.weight for term in config.distill.terms}
    assert weights["generation_1"] == weights["distill"] == distill
    assert weights["baseline"] == {term.name: term.weight for term in config.baseline.terms}
    legacy = {"terms": [{"name": "kd", "weight": 0.9}]}  # a summary written before the plan was recorded
    assert stage_weights(legacy) == {"distill": {"kd": 0.9}}
