"""Causal-LM distillation beyond token KD on the training windows: sequence-level KD on the teacher's
generations, on-policy KD (GKD), a teacher cache of top-k log-probs, the Hugging Face export of an LM
run, and a two-process run. Tiny GPT-2s on a tiny character corpus; the teacher trains once per module."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from safetensors.torch import load_file  # noqa: E402
from test_lm_run import _config, _corpus  # noqa: E402
from tolerance import close  # noqa: E402

from alambic.config import config_from_dict, dump_config  # noqa: E402
from alambic.core import llm  # noqa: E402
from alambic.data import load_tokenizer  # noqa: E402
from alambic.errors import ConfigError  # noqa: E402
from alambic.run import lm_distill  # noqa: E402
from alambic.run.artifacts import export_run, load_run_model  # noqa: E402
from alambic.run.pipeline import run  # noqa: E402
from alambic.run.teacher_cache import cache_teacher_outputs  # noqa: E402

BATCH = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a teacher trained on it once: ``(corpus, teacher checkpoint)``."""
    folder = tmp_path_factory.mktemp("lm")
    corpus = _corpus(folder / "corpus.txt")
    run_dir = run(_config(corpus, stages=["teacher"]), run_dir=folder / "teacher-run")
    return corpus, str(run_dir / "teacher" / "model.safetensors")


def _distill_config(trained, stages=("distill",), **distill):
    corpus, checkpoint = trained
    config = _config(corpus, stages=list(stages))
    config = _config(
        corpus,
        stages=list(stages),
        distill={"train": config.distill.train.model_dump(), **distill},
        evaluate={"batch_sizes": [1], "latency_repeats": 1},
    )
    config.teacher.model.checkpoint = checkpoint
    config.teacher.train = None
    return config


def _train_steps(run_dir, stage):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in records if r["stage"] == stage and r["kind"] == "train")


def test_sequence_kd_trains_the_student_on_teacher_generations_written_once(trained, tmp_path, monkeypatch):
    settings = {"samples": 48, "prompt_tokens": 4, "new_tokens": 12, "top_k": 5}
    config = _distill_config(trained, stages=("baseline", "distill"), sequence_kd=settings)
    config.distill.train.log_every = 1
    run_dir = run(config, run_dir=tmp_path / "run")
    folder = run_dir / "teacher_generations"
    ids = load_file(str(folder / "generations.safetensors"))["input_ids"]
    assert ids.shape == (48, 16)
    stored = json.loads((folder / "settings.json").read_text())
    assert stored["new_tokens"] == 12 and len(stored["teacher_checksum"]) == 64
    # the prompts are the first tokens of training windows
    loaded = load_run_model(run_dir, model="baseline")
    windows = {tuple(row["input_ids"][:4].tolist()) for row in loaded.train_set}
    assert all(tuple(prompt) in windows for prompt in ids[:, :4].tolist())
    # the distilled student trained on the 48 generations, the baseline on the training windows
    assert _train_steps(run_dir, "distill") == math.ceil(48 / BATCH)
    assert _train_steps(run_dir, "baseline") == math.ceil(len(loaded.train_set) / BATCH)
    # resumed: the stored generations are read back, not made again
    (run_dir / "student" / "model.safetensors").unlink()

    original = lm_distill.teacher_generations

    def only_the_preflight_probe(teacher, prompts, *args, **kwargs):
        assert len(prompts) == 1, "the teacher generated the training set again"
        return original(teacher, prompts, *args, **kwargs)

    monkeypatch.setattr(lm_distill, "teacher_generations", only_the_preflight_probe)
    config.stages = ["distill"]
    run(config, run_dir=run_dir, resume=True)
    assert torch.equal(load_file(str(folder / "generations.safetensors"))["input_ids"], ids)


def test_on_policy_batches_are_the_students_samples_scored_by_the_teacher(trained, tmp_path, monkeypatch):
    seen = []
    original = llm.OnPolicyBatches.on_policy

    def spy(self, batch, generator=None):
        sampled = original(self, batch, generator)
        seen.append(sampled)
        return sampled

    monkeypatch.setattr(llm.OnPolicyBatches, "on_policy", spy)
    config = _distill_config(
        trained,
        on_policy={"mix": 1.0, "prompt_tokens": 4},
        terms=[{"loss": "jsd", "params": {"beta": 0.5}}],
    )
    run_dir = run(config, run_dir=tmp_path / "run")
    steps = _train_steps(run_dir, "distill")
    assert len(seen) >= steps  # every training batch (mix 1), plus the pre-flight's
    for batch in seen:
        assert (batch["labels"][:, :4] == -100).all() and (batch["labels"][:, 4:] >= 0).all()
    assert (run_dir / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"on_policy": {"mix": 0.5}, "terms": [{"loss": "lm_ce"}]}, "add one to distill.terms"),
        ({"on_policy": {"prompt_tokens": 16}}, "leaves nothing to sample"),
        ({"on_policy": {}, "sequence_kd": {}}, "keep one of them"),
        ({"on_policy": {}, "teacher_cache": "cache"}, "remove distill.teacher_cache or on_policy"),
        ({"sequence_kd": {"prompt_tokens": 17}}, "exceeds data.block_size"),
    ],
)
def test_language_model_distillation_settings_are_checked(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path / "corpus.txt", distill=changes)


def test_sequence_and_on_policy_kd_are_for_causal_lms():
    with pytest.raises(ConfigError, match="set task: causal-lm"):
        config_from_dict(
            {"student": {"model": {"arch": "mlp"}}, "teacher": {"model": {"arch": "mlp", "checkpoint": "t"}},
             "distill": {"sequence_kd": {}}}
        )  # fmt: skip


def test_generations_longer_than_the_teacher_context_fail_before_the_run_directory(trained, tmp_path):
    config = _distill_config(trained, sequence_kd={"samples": 2, "prompt_tokens": 4, "new_tokens": 70})
    with pytest.raises(ConfigError, match="the teacher cannot generate 74 tokens"):
        run(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_top_k_teacher_cache_of_a_text_corpus_distills_a_student(trained, tmp_path):
    config = _distill_config(trained)
    manifest = cache_teacher_outputs(config, tmp_path / "cache", top_k=4)
    assert {"topk_log_probs", "topk_ids", "tail_mass"} <= set(manifest["fields"])
    config.distill.teacher_cache = str(tmp_path / "cache")
    config.stages = ["distill", "evaluate"]
    run_dir = run(config, run_dir=tmp_path / "run")
    distilled = json.loads((run_dir / "summary.json").read_text())["models"]["distilled"]
    assert math.isfinite(distilled["perplexity"]) and math.isfinite(distilled["kl_to_teacher"])


def test_a_top_k_cache_of_prompt_completion_rows_with_dynamic_padding_distills_a_student(trained, tmp_path):
    """Padded jsonl rows (the corpus's characters, so the teacher's vocabulary), cached on batches cut to their longest row: the per-token top-k fields (``tail_mass``
    ``[B, T]`` too) are padded back along their token axis and cut again for the student's trimmed batches."""
    import random

    from test_lm_run import WORDS

    rng = random.Random(1)

    def words(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = [{"prompt": words(1, 3) + " ", "completion": words(1, 6) + "\n"} for _ in range(120)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    config = _distill_config(trained)
    config.data.dataset, config.data.train_file, config.data.valid_file = "jsonl", str(path), str(path)
    config.data.dynamic_padding = True
    manifest = cache_teacher_outputs(config, tmp_path / "cache", top_k=4)
    width = manifest["width"]
    axes = manifest["token_axes"]
    assert {name: (field["shape"], axes[name]) for name, field in manifest["fields"].items()} == {
        "topk_log_probs": ([width, 4], [0]),
        "topk_ids": ([width, 4], [0]),
        "tail_mass": ([width], [0]),
    }
    config.distill.teacher_cache = str(tmp_path / "cache")
    config.stages = ["distill", "evaluate"]
    run_dir = run(config, run_dir=tmp_path / "run")
    distilled = json.loads((run_dir / "summary.json").read_text())["models"]["distilled"]
    assert math.isfinite(distilled["perplexity"]) and math.isfinite(distilled["kl_to_teacher"])


def test_the_hugging_face_export_of_an_lm_run_reloads_with_its_tokenizer(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = run(_distill_config(trained), run_dir=tmp_path / "run")
    report = export_run(run_dir, export_format="safetensors")
    folder = run_dir / "export" / "student-hf"
    assert report["path"] == str(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = load_tokenizer(str(folder))  # the run's character set, copied in
    assert tokenizer.chars == load_tokenizer(str(run_dir / "tokenizer")).chars
    ids = torch.tensor([tokenizer.encode("the cat sat on")])
    original = load_run_model(run_dir).model
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, **close(expected))


@pytest.mark.slow  # torch.onnx.export takes seconds even for a tiny GPT-2
def test_the_onnx_export_of_an_lm_run_gives_its_logits(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    run_dir = run(_distill_config(trained), run_dir=tmp_path / "run")
    onnx = export_run(run_dir, export_format="onnx")  # the logits of input_ids, checked in onnxruntime
    assert onnx["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_two_processes_run_sequence_kd_and_gather_the_same_lm_metrics(trained, tmp_path):
    config = _distill_config(
        trained,
        stages=("distill", "evaluate"),
        sequence_kd={"samples": 32, "prompt_tokens": 4, "new_tokens": 12},
    )
    (tmp_path / "config.yaml").write_text(dump_config(config))
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
               "-m", "alambic.cli", "run", str(tmp_path / "config.yaml"), "--out", str(run_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert load_file(str(run_dir / "teacher_generations" / "generations.safetensors"))["input_ids"].shape == (
        32,
        16,
    )
    from alambic.run.pipeline import evaluate_run

    single = evaluate_run(run_dir)  # this process alone, on the saved weights
    for name in ("teacher", "distilled"):
        two, one = summary["models"][name], single["models"][name]
        assert two["tokens"] == one["tokens"]
        assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4, abs=1e-6)
        assert two["kl_to_teacher" if name != "teacher" else "loss"] == pytest.approx(
            one["kl_to_teacher" if name != "teacher" else "loss"], rel=1e-4, abs=1e-6
        )
