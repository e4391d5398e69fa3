"""Record the core benchmarks of BENCHMARKS.md: Hinton et al. 2015 on MNIST, ResNet-56 -> ResNet-20 on CIFAR-10.

Runs a recipe through the same code path as ``alambic run`` and prints a markdown block with the
numbers, the command, the machine and the date. Speed numbers belong here, never in tests.

    python benchmarks/core.py mnist-hinton --data-dir ../shared/data/mnist [--set distill.train.epochs=20 ...]
    python benchmarks/core.py cifar10 --data-dir ../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from alambic.config import load_config
from alambic.run.pipeline import run

RECIPES = {
    "mnist-hinton": "recipes/mnist-hinton.yaml",
    "cifar10": "recipes/cifar10-resnet56-resnet20.yaml",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=sorted(RECIPES))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="runs/benchmarks")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    overrides = [f"data.data_dir={args.data_dir}", f"output_dir={args.out}", *args.overrides]
    config = load_config(RECIPES[args.benchmark], overrides)
    run_dir = run(config, run_dir=Path(args.out) / f"{config.name}-{date.today():%Y%m%d}")
    summary = json.loads((run_dir / "summary.json").read_text())
    timings = summary["stages_seconds"]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"\n### {config.name}\n")
    print(
        f"`{command}` — {date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| model | arch | test errors | accuracy % | params | epochs | train wall s | ms @1 | ms @64 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    epochs = {
        "teacher": config.teacher.train.epochs if config.teacher.train else 0,
        "baseline": (config.baseline.train or config.distill.train).epochs,
        "distilled": config.distill.train.epochs,
    }
    stage_of = {"teacher": "teacher", "baseline": "baseline", "distilled": "distill"}
    for name, model in summary["models"].items():
        seconds = timings.get(stage_of[name])
        trained = "pretrained" if (name == "teacher" and config.teacher.model.checkpoint) else epochs[name]
        print(
            f"| {name} | {model['architecture']} | {model['errors']} | {100 * model['accuracy']:.2f} | "
            f"{model['parameters']:,} | {trained} | {seconds if seconds is not None else '-'} | "
            f"{model['latency_ms']['1']:.3f} | {model['latency_ms']['64']:.3f} |"
        )
    print(f"\nrun directory: {run_dir}")


if __name__ == "__main__":
    main()
