"""The packaged language-model recipes: each validates, covers its case, and trains every stage at a tiny
budget (``--set`` overrides: a small corpus built here, a few steps). Evaluation is left to
tests/test_lm_run.py and tests/test_lora.py: sampling and timing generation would take most of the time."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from safetensors.torch import load_file  # noqa: E402
from test_lm_run import _corpus  # noqa: E402

from alambic.config import load_config  # noqa: E402
from alambic.packaged import packaged_recipes, recipe_purpose  # noqa: E402
from alambic.run.pipeline import run  # noqa: E402
from alambic.run.teacher_cache import cache_teacher_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LM_RECIPES = sorted((ROOT / "recipes" / "lm").glob("*.yaml"))
TINY = [
    "data.train_subset=48",
    "data.eval_batch_size=64",
    "teacher.train.epochs=1",
    "distill.train.epochs=1",
    "stages=[teacher,baseline,distill]",
]
# what each recipe shows, and the --set overrides that shrink it further
CASES = {
    "sequence-kd": ["distill.sequence_kd.samples=32", "distill.sequence_kd.batch_size=32"],
    "on-policy": [],
    "jsonl": [f"data.train_file={ROOT / 'recipes' / 'data' / 'sums.jsonl'}", "data.train_subset=32"],
    "lora": [],
    "cached-teacher": ["stages=[baseline,distill]"],
    "stories260k": None,  # its own data (teacher samples): trained in tests/test_teacher_samples.py
}


def test_every_packaged_lm_recipe_validates_and_shows_its_case():
    assert sorted(path.stem for path in LM_RECIPES) == sorted(CASES)
    assert (packaged_recipes() / "lm").resolve() == (ROOT / "recipes" / "lm").resolve()
    configs = {path.stem: load_config(path) for path in LM_RECIPES}
    for name, config in configs.items():
        assert config.task == "causal-lm" and recipe_purpose(LM_RECIPES[0].parent / f"{name}.yaml"), name
    assert configs["sequence-kd"].distill.sequence_kd is not None
    assert configs["on-policy"].distill.on_policy is not None
    assert configs["jsonl"].data.dataset == "jsonl"
    assert configs["lora"].student.model.lora is not None
    assert configs["cached-teacher"].distill.teacher_cache
    assert configs["stories260k"].data.dataset == "teacher-samples"


@pytest.mark.parametrize("name", sorted(name for name, overrides in CASES.items() if overrides is not None))
def test_each_lm_recipe_trains_every_stage_at_a_tiny_budget(name, tmp_path):
    if name == "lora":
        pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    recipe = ROOT / "recipes" / "lm" / f"{name}.yaml"
    overrides = [*TINY, f"data.train_file={_corpus(tmp_path / 'corpus.txt')}", *CASES[name]]
    if name == "cached-teacher":  # its assets: a trained teacher, then its cache
        teacher_config = load_config(
            recipe, [*overrides, "stages=[teacher]", "teacher.model.checkpoint=null"]
        )
        teacher_run = run(teacher_config, run_dir=tmp_path / "teacher")
        checkpoint = teacher_run / "teacher" / "model.safetensors"
        overrides += [f"teacher.model.checkpoint={checkpoint}", f"distill.teacher_cache={tmp_path / 'cache'}"]
        cache_teacher_outputs(load_config(recipe, overrides), tmp_path / "cache", top_k=8)
    run_dir = run(load_config(recipe, overrides), run_dir=tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {record["stage"]: record for record in records if record["kind"] == "eval"}
    assert {"baseline", "distill"} <= set(evaluated) and (run_dir / "student" / "model.safetensors").is_file()
    assert all(math.isfinite(record["perplexity"]) for record in evaluated.values())  # held out, each stage
    if name == "lora":  # only the adapters were saved as trainable: the frozen layers keep their names
        saved = load_file(str(run_dir / "student" / "model.safetensors"))
        assert any(".lora_A." in key for key in saved) and any(".base_layer." in key for key in saved)
