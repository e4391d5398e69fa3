"""Which settings each stage of a run trains from (alambic.run.resume): what a corrected config may
change when a run continues, stage by stage."""

import copy
from pathlib import Path

import pytest

from alambic.config import config_from_dict
from alambic.run.resume import check_resumable, differences, stage_settings

STRATEGIES = Path(__file__).resolve().parents[1] / "recipes" / "strategies"
BASE = {
    "data": {"dataset": "digits"},
    "teacher": {"model": {"arch": "mlp"}, "train": {"epochs": 1}},
    "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [8]}}},
}


def _resolved(changes: dict | None = None) -> dict:
    data = copy.deepcopy(BASE)
    for path, value in (changes or {}).items():
        node = data
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(data).model_dump(mode="json")


@pytest.mark.parametrize(
    ("change", "teacher", "baseline", "distill"),
    [
        ({"teacher.train.lr": 0.2}, True, False, True),  # the distilled student learns from that teacher
        ({"student.model.kwargs": {"hidden": [16]}}, False, True, True),
        ({"distill.train.lr": 0.2}, False, True, True),  # the baseline trains with distill.train by default
        ({"baseline.train": {"epochs": 3}, "distill.train.lr": 0.2}, False, False, True),  # see below
        ({"distill.terms": [{"loss": "kd"}]}, False, False, True),
        ({"seed": 3}, True, True, True),
        ({"data.train_subset": 100}, True, True, True),
        ({"data.data_dir": "/elsewhere"}, False, False, False),  # where the data lies, not what it is
        ({"data.eval_batch_size": 16}, False, False, False),
        ({"evaluate.latency_repeats": 3}, False, False, False),
        ({"name": "other"}, False, False, False),
    ],
)
def test_each_stage_depends_on_its_own_settings(change, teacher, baseline, distill):
    before, after = _resolved(), _resolved(change)
    changed = {stage: bool(differences(stage_settings(before, stage), stage_settings(after, stage)))
               for stage in ("teacher", "baseline", "distill")}  # fmt: skip
    if "baseline.train" in change:  # an explicit baseline budget: distill.train no longer reaches it
        before = _resolved({"baseline.train": {"epochs": 3}})
        changed["baseline"] = bool(
            differences(stage_settings(before, "baseline"), stage_settings(after, "baseline"))
        )
    assert changed == {"teacher": teacher, "baseline": baseline, "distill": distill}


def test_the_tokenizer_an_hf_teacher_gives_the_data_is_part_of_every_stage():
    base = {
        "data": {"dataset": "sst2"},
        "teacher": {"model": {"arch": "hf:/models/a"}, "train": {"epochs": 1}},
        "student": {"model": {"arch": "hf:/models/small"}},
    }
    other = copy.deepcopy(base)
    other["teacher"]["model"]["arch"] = "hf:/models/b"  # another teacher: another tokenizer for the data
    before, after = (config_from_dict(c).model_dump(mode="json") for c in (base, other))
    assert differences(stage_settings(before, "baseline"), stage_settings(after, "baseline"))


def test_started_folders_are_mapped_to_their_stage(tmp_path):
    for folder in ("teacher", "student"):
        (tmp_path / folder / "checkpoints" / "epoch-0").mkdir(parents=True)
    before = _resolved()
    with pytest.raises(Exception, match="the teacher stage has started"):
        check_resumable(tmp_path, before, _resolved({"teacher.train.lr": 0.3}))
    (tmp_path / "teacher" / "checkpoints" / "epoch-0").rmdir()
    (tmp_path / "teacher" / "checkpoints").rmdir()
    with pytest.raises(Exception, match="the distill stage has started"):
        check_resumable(tmp_path, before, _resolved({"distill.terms": [{"loss": "kd"}]}))
    assert check_resumable(tmp_path, before, _resolved({"name": "renamed"})) == ["name: 'run' -> 'renamed'"]


@pytest.mark.parametrize(
    ("recipe", "folders"),
    [
        ("ensemble.yaml", {"teacher_1": "teacher", "teacher_2": "teacher", "student": "distill"}),
        ("born-again.yaml", {"generation_1": "distill", "baseline": "baseline"}),
        ("assistants.yaml", {"assistant_1": "distill", "teacher": "teacher"}),
        ("mutual.yaml", {"peer_1": "distill", "student": "distill"}),
    ],
)
def test_a_strategy_plans_the_folders_resume_reads(recipe, folders):
    from alambic.config import load_config
    from alambic.run.plan import settings_of_folders
    from alambic.run.planners import plan

    planned = settings_of_folders(plan(load_config(STRATEGIES / recipe)))
    assert {folder: planned.get(folder) for folder in folders} == folders
