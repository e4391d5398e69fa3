"""A causal-LM run from a config: data from a local text file, models built from Hugging Face configs,
teacher, baseline and distilled student, held-out perplexity in summary.json and report.md."""

import json
import math
import random

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from alambic.config import config_from_dict  # noqa: E402
from alambic.errors import ConfigError  # noqa: E402
from alambic.run.pipeline import run  # noqa: E402

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "while",
    "birds",
    "sang",
    "over",
    "green",
    "hills",
]


def _corpus(path):
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)))
    return path


def _config(corpus, **changes):
    train = {
        "epochs": 1,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.0,
        "log_every": 5,
    }
    data = {
        "task": "causal-lm",
        "data": {"dataset": "text", "train_file": str(corpus), "tokenizer": "chars", "block_size": 16},
        "teacher": {
            "model": {
                "arch": "hf-config",
                "kwargs": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64},
            },
            "train": train,
        },
        "student": {
            "model": {
                "arch": "hf-config",
                "kwargs": {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 64},
            }
        },
        "distill": {"train": train},
        "evaluate": {"batch_sizes": [1], "latency_repeats": 1},
    }
    data.update(changes)
    return config_from_dict(data)


def test_a_causal_lm_run_reports_held_out_perplexity_for_every_model(tmp_path):
    run_dir = run(_config(_corpus(tmp_path / "corpus.txt")), run_dir=tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and set(summary["models"]) == {"teacher", "baseline", "distilled"}
    for name, model in summary["models"].items():
        assert math.isfinite(model["perplexity"]) and model["perplexity"] == pytest.approx(
            math.exp(model["loss"])
        )
        # characters: one unit per predicted token, so bits per character is the loss in bits
        assert model["unit"] == "char" and model["bits_per_unit"] == pytest.approx(
            model["loss"] / math.log(2)
        )
        assert model["generation"]["tokens_per_s"] > 0
        assert all(isinstance(sample["continuation"], str) for sample in model["samples"])
        assert ("kl_to_teacher" in model) == (name != "teacher")
    # the untrained baseline of 1 epoch is far from the teacher, which trains a wider model the same time
    assert summary["models"]["teacher"]["perplexity"] < summary["models"]["baseline"]["perplexity"]
    assert (run_dir / "tokenizer" / "alambic-tokenizer.json").is_file()
    report = (run_dir / "report.md").read_text()
    assert "## Language model" in report and "## Samples" in report and "bits / char" in report
    evaluated = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row["kind"] == "eval" and "perplexity" in row for row in evaluated)


def test_a_student_with_another_vocabulary_is_refused_before_the_run_directory_exists(tmp_path):
    config = _config(_corpus(tmp_path / "corpus.txt"))
    config.student.model.kwargs["vocab_size"] = 7
    with pytest.raises(ConfigError, match="vocabulary of 7 tokens but the tokenizer has"):
        run(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "classification"}, "set task: causal-lm"),
        ({"data": {"dataset": "digits"}}, "set data.dataset to text or jsonl"),
        ({"data": {"dataset": "text", "tokenizer": "chars"}}, "needs data.train_file"),
    ],
)
def test_task_and_data_must_agree(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path / "corpus.txt", **changes)
