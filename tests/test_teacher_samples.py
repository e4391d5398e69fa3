"""``data.dataset: teacher-samples``: a pretrained llama2.c teacher (no tokenizer) writes its own training
text, and recipes/lm/stories260k.yaml trains on it, on a tiny llama2.c file written here."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from test_llama2c import _tiny_weights, _write  # noqa: E402

from alambic.config import load_config  # noqa: E402
from alambic.errors import ConfigError  # noqa: E402
from alambic.run import teacher_samples  # noqa: E402
from alambic.run.building import build_run_datasets  # noqa: E402
from alambic.run.pipeline import run  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lm" / "stories260k.yaml"


def _config(tmp_path: Path, *overrides: str):
    teacher = _write(tmp_path / "tiny.bin", _tiny_weights(True), True)  # vocabulary 32, context 16
    return load_config(
        RECIPE,
        [
            f"teacher.model.arch=llama2c:{teacher}",
            "data.teacher_samples.samples=24",
            "data.teacher_samples.validation=8",
            "data.teacher_samples.new_tokens=9",
            "student.model.kwargs.hidden_size=8",
            "student.model.kwargs.intermediate_size=16",
            "student.model.kwargs.num_hidden_layers=1",
            "student.model.kwargs.num_attention_heads=2",
            "student.model.kwargs.num_key_value_heads=1",
            "student.model.kwargs.max_position_embeddings=16",
            "distill.train.epochs=1",
            "distill.train.batch_size=8",
            *overrides,
        ],
    )


def test_stories260k_recipe_trains_on_teacher_samples_written_once(tmp_path, monkeypatch):
    config = _config(tmp_path, "stages=[baseline,distill]")
    run_dir = run(config, run_dir=tmp_path / "run")  # the llama2c: teacher is the trained teacher
    stored = teacher_samples.load_file(str(run_dir / "teacher_samples" / "samples.safetensors"))
    train, validation = stored["train"], stored["validation"]
    assert train.shape == (24, 10) and validation.shape == (8, 10)
    assert (train[:, 0] == 1).all() and (validation[:, 0] == 1).all()  # from the teacher's BOS token
    assert not any(torch.equal(row, other) for row in validation for other in train)  # fresh samples
    # read back, not generated again: by the next build of the run's data and by the resumed run
    monkeypatch.setattr(teacher_samples, "generate_rows", lambda *_: pytest.fail("generated again"))
    train_set, test_set, info = build_run_datasets(config, run_dir=run_dir)
    assert torch.equal(train_set.columns["input_ids"], train) and info.num_classes == 32
    assert (train_set.columns["labels"][:, 0] == -100).all()  # the prompt is not predicted
    assert torch.equal(test_set.columns["input_ids"], validation)
    evaluated = _config(tmp_path, "stages=[baseline,distill,evaluate]", "evaluate.latency_repeats=1")
    run(evaluated, run_dir=run_dir, resume=True)
    models = json.loads((run_dir / "summary.json").read_text())["models"]
    assert set(models) == {"teacher", "baseline", "distilled"} and models["distilled"]["kl_to_teacher"] > 0
    assert models["baseline"]["parameters"] < models["teacher"]["parameters"]
    assert models["teacher"]["unit"] == "token" and models["teacher"]["tokens"] == 8 * 9


def test_export_reads_the_run_samples_without_building_the_teacher(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from alambic.run import building
    from alambic.run.artifacts import export_run, load_run_model

    run_dir = run(_config(tmp_path, "stages=[baseline,distill]"), run_dir=tmp_path / "run")
    samples = run_dir / "teacher_samples" / "samples.safetensors"
    stored = teacher_samples.load_file(str(samples))
    monkeypatch.setattr(teacher_samples, "generate_rows", lambda *_: pytest.fail("generated again"))
    builds = []
    monkeypatch.setattr(building, "sampling_teacher", lambda config: builds.append(1) or pytest.fail("built"))
    (tmp_path / "tiny.bin").unlink()  # the teacher's file is gone after the run
    loaded = load_run_model(run_dir)
    assert torch.equal(loaded.test_set.columns["input_ids"], stored["validation"])  # the run's own rows
    assert loaded.info.num_classes == 32 and loaded.info.input_shape == (10,)
    report = export_run(run_dir, export_format="safetensors")
    assert report["max_abs_diff"] < 1e-4 and report["checked_samples"] == 8
    assert not builds
    # a folder written before the vocabulary was recorded: the teacher is built to read it back
    save_file(stored, str(samples))
    monkeypatch.undo()
    monkeypatch.setattr(teacher_samples, "generate_rows", lambda *_: pytest.fail("generated again"))
    with pytest.raises(ConfigError, match="tiny.bin"):
        load_run_model(run_dir)


def test_teacher_samples_follow_the_seed_and_settings(tmp_path):
    first, _, _ = build_run_datasets(_config(tmp_path))
    again, _, _ = build_run_datasets(_config(tmp_path))
    other, _, _ = build_run_datasets(_config(tmp_path, "data.teacher_samples.seed=1"))
    greedy, _, _ = build_run_datasets(_config(tmp_path, "data.teacher_samples.top_k=1"))
    assert torch.equal(first.columns["input_ids"], again.columns["input_ids"])
    assert not torch.equal(first.columns["input_ids"], other.columns["input_ids"])
    assert (greedy.columns["input_ids"] == greedy.columns["input_ids"][0]).all()  # one greedy story
    train, valid, _ = build_run_datasets(_config(tmp_path, "data.teacher_samples.samples=8"))
    assert not torch.equal(train.columns["input_ids"], valid.columns["input_ids"])  # another random stream


def test_teacher_samples_need_a_teacher_that_exists_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match="teacher-samples is generated by a teacher that exists"):
        _config(tmp_path, "stages=[teacher,baseline,distill]", "teacher.train={epochs: 1}")
    with pytest.raises(ConfigError, match="teacher_samples goes with data.dataset"):
        _config(tmp_path, "data.dataset=text", "data.train_file=x.txt")
    with pytest.raises(ConfigError, match="41 tokens exceed the teacher's context of 16"):
        build_run_datasets(_config(tmp_path, "data.teacher_samples.new_tokens=40"))
    with pytest.raises(ConfigError, match="cannot generate 1 \\+ 9 tokens from prompt \\[40\\]"):
        build_run_datasets(_config(tmp_path, "data.teacher_samples.prompt=[40]"))  # past its 32 tokens


def test_a_pretrained_causal_lm_is_the_trained_teacher_without_a_teacher_stage(tmp_path):
    demo = RECIPE.parents[1] / "lm-demo.yaml"
    hf_teacher = ["teacher.model.arch=hf:some/folder", "teacher.model.kwargs={}"]
    assert _config(tmp_path).loads_teacher()  # llama2c:, no teacher stage
    assert load_config(demo, [*hf_teacher, "stages=[baseline,distill]"]).loads_teacher()
    assert not load_config(demo, hf_teacher).loads_teacher()  # with the stage: fine-tuned first
    assert not load_config(demo, ["stages=[baseline,distill]"]).loads_teacher()  # hf-config: random weights
