"""`alambic demo --task lm` end to end on the packaged Tiny Shakespeare with a tiny budget, and gzip text."""

import gzip
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from typer.testing import CliRunner  # noqa: E402

from alambic.cli import app, demo_overrides  # noqa: E402
from alambic.data.lm import read_text  # noqa: E402
from alambic.errors import AlambicError, DataError  # noqa: E402

TINY = {
    "data.train_subset": 32,
    "data.valid_fraction": 0.002,  # about 2,200 held-out characters
    "teacher.train.epochs": 1,
    "distill.train.epochs": 1,
    "evaluate.latency_repeats": 1,
}


def test_the_lm_demo_trains_three_models_on_the_packaged_corpus(tmp_path):
    overrides = [part for key, value in TINY.items() for part in ("--set", f"{key}={value}")]
    threads = torch.get_num_threads()
    result = CliRunner().invoke(
        app, ["demo", "--task", "lm", "--out", str(tmp_path), *overrides], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["dataset"] == "text"
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    assert all(model["perplexity"] > 1 for model in summary["models"].values())
    # the student is smaller than the teacher by at least 4x in parameters
    assert summary["models"]["teacher"]["parameters"] >= 4 * summary["models"]["baseline"]["parameters"]
    assert "ppl" in result.output and (run_dir / "report.md").is_file()
    assert torch.get_num_threads() == threads  # the demo's one thread does not outlive it


def test_the_lm_demo_reads_its_corpus_from_the_package():
    recipe, overrides = demo_overrides("lm", "digits", None)
    (corpus,) = [item.split("=", 1)[1] for item in overrides if item.startswith("data.train_file=")]
    assert recipe.name == "lm-demo.yaml" and recipe.is_file()
    text = read_text(corpus)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")


@pytest.mark.parametrize(
    ("task", "dataset", "data_dir"),
    [("vision", "digits", None), ("lm", "mnist", None), ("lm", "digits", "x")],
)
def test_the_demo_refuses_a_task_or_data_it_cannot_run(task, dataset, data_dir):
    with pytest.raises(AlambicError):
        demo_overrides(task, dataset, data_dir)


def test_read_text_reads_gzip_compressed_text(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress("Où est le chat?\n".encode()))
    assert read_text(path) == "Où est le chat?\n"


def test_read_text_names_a_corrupt_gzip_file(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_text(path)
