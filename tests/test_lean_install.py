"""A lean install (issue 25): ``pip install -e .`` without extras runs ``alambic demo``; ``alambic demo --task
lm`` needs only the ``hf`` extra and says so in one line when transformers is missing. The packages of the
extras are made unimportable (``sys.modules[name] = None``) in a fresh interpreter, as if not installed.
Sizes and install times are in BENCHMARKS.md (``benchmarks/install_size.sh``)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# every package an extra adds (pyproject.toml's optional-dependencies), none of which the core needs
EXTRAS_PACKAGES = (
    "transformers", "peft", "onnx", "onnxruntime", "onnxscript", "optuna", "torchao", "tensorboard", "wandb",
    "mlflow", "keras", "importlinter",
)  # fmt: skip


def _alambic(arguments: list[str], cwd, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    """``alambic ARGUMENTS`` in a fresh interpreter where the ``blocked`` packages cannot be imported."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # an import of it raises ImportError, as if not installed
        sys.argv = ["alambic", *{arguments!r}]
        from alambic.cli import main
        main()
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
    )


def test_the_lm_demo_without_transformers_says_so_in_one_line(tmp_path):
    result = _alambic(["demo", "--task", "lm", "--out", "runs"], tmp_path, ("transformers",))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert len(output.splitlines()) == 1 and "Traceback" not in output, output
    assert "demo --task lm" in output and "transformers" in output and "pip install 'alambic[hf]'" in output
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.slow
def test_the_demo_runs_without_any_extra(tmp_path):
    """The classification demo on digits, shortened to one epoch per model, with no extra importable."""
    settings = ["teacher.train.epochs=1", "distill.train.epochs=1", "evaluate.latency_repeats=1"]
    overrides = [part for setting in settings for part in ("--set", setting)]
    result = _alambic(["demo", "--out", "runs", *overrides], tmp_path, EXTRAS_PACKAGES)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
