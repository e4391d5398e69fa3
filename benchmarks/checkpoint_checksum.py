"""What the SHA-256 checksums of a training checkpoint cost (issue 25), against writing and resuming it.

A student of ``--params`` parameters (linear layers, float32) trained one AdamW step, so the checkpoint
holds its weights and two optimizer tensors per weight (about 12 bytes a parameter). Each round writes a
checkpoint with :func:`save_training_state` (which now hashes every file before it is renamed into place),
hashes the written files again alone (:func:`file_checksums`, the files in the page cache, as they are
right after writing), verifies them (:func:`verify_checksums`, what a resume adds) and resumes from them
(:func:`load_training_state`, the verification included). Wall-clock seconds, the median of ``--rounds``.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_checksum.py --params 22e6 110e6

Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from alambic.core.checkpoint import file_checksums, load_training_state, save_training_state, verify_checksums


def training_parts(params: int) -> dict:
    width = 1024
    layers = max(1, round(params / (width * width + width)))
    module = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return {"module": module, "optimizer": optimizer, "scheduler": scheduler}


def timed(call, *args, **kwargs) -> float:
    started = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - started


def measure(params: int, rounds: int, folder: Path) -> dict:
    parts = training_parts(params)
    times: dict[str, list[float]] = {"write": [], "hash": [], "verify": [], "resume": []}
    for round_index in range(rounds):
        directory = folder / f"round-{round_index}"
        times["write"].append(timed(save_training_state, directory, epoch=0, step=1, **parts))
        checkpoint = directory / "ckpt-0000"
        times["hash"].append(timed(file_checksums, checkpoint))
        times["verify"].append(timed(verify_checksums, checkpoint, ""))
        times["resume"].append(timed(load_training_state, checkpoint, **parts))
        size = sum(file.stat().st_size for file in checkpoint.iterdir())
        shutil.rmtree(directory)
    medians = {name: statistics.median(values) for name, values in times.items()}
    medians["parameters"] = sum(p.numel() for p in parts["module"].parameters())
    medians["megabytes"] = size / 1e6
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[22e6])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(
            "| parameters | checkpoint MB | write s (hash included) | hash alone s | share of write | verify s | resume s (verify included) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for params in args.params:
            row = measure(int(params), args.rounds, Path(folder))
            print(
                f"| {row['parameters'] / 1e6:.1f}M | {row['megabytes']:.0f} | {row['write']:.3f} | {row['hash']:.3f} | "
                f"{row['hash'] / row['write']:.0%} | {row['verify']:.3f} | {row['resume']:.3f} |"
            )


if __name__ == "__main__":
    main()
