"""A character-level model on Tiny Shakespeare through the run pipeline (issue 15, benchmark 2).

Runs a recipe (default ``recipes/shakespeare-char.yaml``) with :func:`alambic.run.pipeline.run`: the
teacher trained in the run, the student trained alone (baseline) and distilled, at the same number of
student steps. Prints each model's held-out loss and perplexity, and the share of the baseline-to-teacher
gap in held-out loss that the distilled student closes, in markdown; the goal is at least 30%.

    OMP_NUM_THREADS=2 python benchmarks/lm_shakespeare.py \\
        --data ../shared/data/tinyshakespeare/input.txt --out /tmp/bench-lm [--set key=value ...]

Needs the hf extra (transformers). Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from alambic.config import load_config
from alambic.run.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.30  # share of the gap the distilled student must close


def gap_closed(teacher: float, baseline: float, distilled: float) -> float:
    """``(baseline - distilled) / (baseline - teacher)`` of held-out losses: 0 = no better than alone, 1 = the teacher."""
    return (baseline - distilled) / (baseline - teacher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "shakespeare-char.yaml"))
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
    )
    parser.add_argument(
        "--out", default="runs/bench-lm-shakespeare", help="the run directory (must not exist)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override: key.path=value"
    )
    args = parser.parse_args()

    config = load_config(args.config, [f"data.train_file={args.data}", *args.overrides])
    start = time.perf_counter()
    run_dir = run(config, run_dir=Path(args.out))
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    timings = json.loads((run_dir / "timings.json").read_text())
    models = summary["models"]
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"{config.name}, {wall:.0f} s wall; run directory {run_dir}\n"
    )
    print("| model | parameters | held-out loss (nats/char) | perplexity | KL to teacher | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, stage in (("teacher", "teacher"), ("baseline", "baseline"), ("distilled", "distill")):
        model = models[name]
        kl = f"{model['kl_to_teacher']:.4f}" if "kl_to_teacher" in model else "-"
        print(
            f"| {name} | {model['parameters']:,} | {model['loss']:.4f} | {model['perplexity']:.3f} | {kl} "
            f"| {timings.get(stage, float('nan')):.0f} |"
        )
    closed = gap_closed(*(models[name]["loss"] for name in ("teacher", "baseline", "distilled")))
    verdict = "met" if closed >= GOAL else "not met"
    print(
        f"\ngap closed: {closed:.1%} of the baseline-to-teacher gap in held-out loss (goal {GOAL:.0%}: {verdict})"
    )


if __name__ == "__main__":
    main()
