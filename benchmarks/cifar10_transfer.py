"""CIFAR-10 (issue 16): does a transfer set help an image student? ResNet-56 -> ResNet-20, plain KD against
KD + a transfer set, at the same number of steps.

The labelled set is the recipe's class-stratified 10,000-image subset (``recipes/cifar10-resnet56-resnet20.yaml``);
the transfer set is the other 40,000 training images without their labels (written once as a ``uint8``
``.npy``), under the same random crop and flip, labelled by the pretrained teacher on the fly. Both runs
take 100,000 training rows in all, in batches of 128: plain KD for ``E`` epochs of the 10,000 labelled
images; KD + transfer set for ``E / 2`` epochs of 20,000 rows (the labelled images and as many transfer
images, ``ratio: 1``; ``ce`` skips the transfer rows), its warm-up halved so that both warm up over the
same steps. Test accuracy on all 10,000 test images.

    OMP_NUM_THREADS=1 python benchmarks/cifar10_transfer.py --data-dir ../shared/data/cifar10-jpeg \\
        --out /work/bench-cache/cifar-transfer --epochs 10 --seeds 0 1 [--only kd|transfer]

Each run is an ordinary run directory under ``--out`` (resumable; a finished one is read, not rerun).
Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import torch

from alambic.config import load_config
from alambic.data import build_datasets
from alambic.run.pipeline import run

RECIPE = "recipes/cifar10-resnet56-resnet20.yaml"


def transfer_images(data_dir: str, out: Path, seed: int) -> Path:
    """The 40,000 training images outside the recipe's 10,000-image subset (chosen by ``seed``), as
    ``uint8 [N, 3, 32, 32]``."""
    path = out / ("cifar10-train-rest.npy" if seed == 0 else f"cifar10-train-rest-seed{seed}.npy")
    if path.exists():
        return path
    full, _, _ = build_datasets("cifar10-jpeg", data_dir=data_dir)
    subset, _, _ = build_datasets("cifar10-jpeg", data_dir=data_dir, train_subset=10000, seed=seed)
    chosen = {row.numpy().tobytes() for row in subset.inputs}
    rest = [i for i, row in enumerate(full.inputs) if row.numpy().tobytes() not in chosen]
    np.save(path, full.inputs[rest].numpy())
    return path


def one_run(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    summary = run_dir / "summary.json"
    if not summary.exists():
        config = load_config(RECIPE, [*overrides, f"output_dir={out}"])
        run(config, run_dir=run_dir, resume=run_dir.exists())
    record = json.loads(summary.read_text())
    # the optimizer steps taken, from the stage's last checkpoint (metrics.jsonl logs every log_every steps)
    steps = json.loads((run_dir / "student" / "checkpoints" / "latest.json").read_text())["step"]
    return {
        "accuracy": record["models"]["distilled"]["accuracy"],
        "seconds": record["stages_seconds"].get("distill"),
        "steps": steps,
        "teacher": record["models"].get("teacher", {}).get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--out", type=Path, default=Path("/work/bench-cache/cifar-transfer"))
    parser.add_argument("--epochs", type=int, default=10, help="plain KD's epochs (the transfer run: half)")
    parser.add_argument("--only", choices=["kd", "transfer"])
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="each picks the subset and the run's seed"
    )
    args = parser.parse_args()
    if args.epochs % 2:
        parser.error("--epochs must be even (the transfer run takes half as many epochs of twice the rows)")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        common = [f"data.data_dir={args.data_dir}", f"seed={seed}", "stages=[distill,evaluate]",
                  "evaluate.latency_repeats=1", "evaluate.batch_sizes=[1]", f"distill.train.eval_every={args.epochs}"]  # fmt: skip
        runs = {
            "kd": [*common, f"distill.train.epochs={args.epochs}"],
            "transfer": [*common, f"distill.train.epochs={args.epochs // 2}", "distill.train.warmup_epochs=0.5",
                         f"data.transfer.path={transfer_images(args.data_dir, args.out, seed)}",
                         "data.transfer.ratio=1.0"],
        }  # fmt: skip
        for name, overrides in runs.items():
            if args.only in (None, name):
                suffix = "" if seed == 0 else f"-seed{seed}"
                results.setdefault(name, []).append(
                    one_run(f"{name}-e{args.epochs}{suffix}", overrides, args.out)
                )
    print(f"\n{torch.get_num_threads()} thread(s), torch {torch.__version__}, {date.today()}\n")
    print(
        "| student ResNet-20 | rows an epoch | epochs | steps | test accuracy % (per seed) | mean | distill wall s |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    labels = {
        "kd": ("plain KD", 10000, args.epochs),
        "transfer": ("KD + transfer set", 20000, args.epochs // 2),
    }
    for name, rows in results.items():
        label, per_epoch, epochs = labels[name]
        accuracies = [100 * row["accuracy"] for row in rows]
        seeds = ", ".join(f"{value:.2f}" for value in accuracies)
        seconds = ", ".join(f"{row['seconds']:.0f}" for row in rows)
        mean = sum(accuracies) / len(accuracies)
        print(
            f"| {label} | {per_epoch:,} | {epochs} | {rows[0]['steps']} | {seeds} | {mean:.2f} | {seconds} |"
        )
    if results.get("kd") and results["kd"][0]["teacher"] is not None:
        print(f"\nteacher ResNet-56 (pretrained): {100 * results['kd'][0]['teacher']:.2f}%")


if __name__ == "__main__":
    main()
