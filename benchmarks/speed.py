"""What distillation costs against its limits, side by side in one run (issue 5).

For one teacher / student pair, on the same data, batch size and loader, it times an epoch of:

  (a) the student trained alone, a plain PyTorch loop (the offline limit)
  (b) the teacher's forward pass alone over the data
  (c) a minimal hand-written PyTorch KD loop (the reference: no framework)
  (d) alambic online KD (``fit`` with a live teacher)
  (e) alambic with a cached teacher (``cache-teacher``, then ``CachedTeacher``)
  (f) (e) with bf16 autocast, and (e) with ``torch.compile``
  (d-overlap) (d) with the teacher's forward on a second CUDA stream (GPU only)

Each variant runs in its own process (so its peak memory is its own): one warm-up epoch, then the
median of ``--epochs`` timed epochs. It prints the ratios d / c (framework overhead), d / (a + b)
(distance from the online limit), e / a (distance from the offline limit), the cache's build time and
the epochs it takes to pay for itself.

    OMP_NUM_THREADS=1 python benchmarks/speed.py mnist-mlp --data-dir ../shared/data/mnist
    OMP_NUM_THREADS=1 python benchmarks/speed.py cifar-resnet --data-dir ../shared/data/cifar10-jpeg --subset 2048

On a machine with CUDA everything runs on the GPU (batches copied from pinned memory, as alambic does).

Models are randomly initialised: speed does not depend on the weights. Speed lives here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from alambic.config import LoopSettings, Term
from alambic.core.distiller import Distiller, Teacher
from alambic.core.loop import fit
from alambic.core.optim import make_accelerator
from alambic.data import IndexedDataset, build_datasets
from alambic.data.loaders import make_loader
from alambic.models import build_model

PAIRS = {
    # Hinton et al.'s MNIST pair: 1200-1200 teacher, 800-800 student
    "mnist-mlp": ("mnist", ("mlp", {"hidden": [1200, 1200]}), ("mlp", {"hidden": [800, 800]})),
    "cifar-resnet": ("cifar10-jpeg", ("resnet56", {}), ("resnet20", {})),
}
TEMPERATURE, KD_WEIGHT = 4.0, 0.9
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = {
    "a": "student alone (plain PyTorch)",
    "b": "teacher forward alone",
    "c": "hand-written KD loop",
    "d": "alambic online KD",
    "d-overlap": "alambic online KD, teacher on a second CUDA stream",
    "e": "alambic cached teacher",
    "f-bf16": "alambic cached + bf16 autocast",
    "f-compile": "alambic cached + torch.compile",
}


def setting(args):
    dataset, teacher_spec, student_spec = PAIRS[args.pair]
    train, _, info = build_datasets(dataset, data_dir=args.data_dir, train_subset=args.subset, seed=0)
    loader = make_loader(IndexedDataset(train), batch_size=args.batch_size, shuffle=True, seed=0)
    torch.manual_seed(0)
    teacher = build_model(teacher_spec[0], input_shape=info.input_shape, num_classes=10, **teacher_spec[1])
    student = build_model(student_spec[0], input_shape=info.input_shape, num_classes=10, **student_spec[1])
    return train, loader, teacher.to(DEVICE), student.to(DEVICE)


def synchronize() -> None:
    """Wait for the GPU's queued work, so that wall-clock time covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed_epochs(run_epoch, epochs: int) -> list[float]:
    """Seconds of each epoch after one warm-up epoch."""
    run_epoch(0)
    synchronize()
    times = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        run_epoch(epoch)
        synchronize()
        times.append(time.perf_counter() - started)
    return times


def plain_loops(variant: str, loader, teacher, student, epochs: int) -> list[float]:
    """(a), (b) and (c): what a user writes without a framework."""
    fused = {"fused": True} if DEVICE.type == "cuda" else {}  # what a user would pick on a GPU
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, **fused)
    teacher.eval().requires_grad_(False)

    def batches():
        for images, labels, _ in loader:
            yield images.to(DEVICE, non_blocking=True), labels.to(DEVICE, non_blocking=True)

    def student_alone(epoch):
        loader.sampler.set_epoch(epoch)
        for images, labels in batches():
            loss = F.cross_entropy(student(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def teacher_forward(epoch):
        loader.sampler.set_epoch(epoch)
        for images, _ in batches():
            teacher(images)

    def hand_written_kd(epoch):  # the reference KD loop
        loader.sampler.set_epoch(epoch)
        for images, labels in batches():
            with torch.no_grad():
                teacher_logits = teacher(images)
            logits = student(images)
            soft = F.kl_div(
                F.log_softmax(logits / TEMPERATURE, dim=-1),
                F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            loss = (1 - KD_WEIGHT) * F.cross_entropy(logits, labels) + KD_WEIGHT * TEMPERATURE**2 * soft
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    student.train()
    run = {"a": student_alone, "b": teacher_forward, "c": hand_written_kd}[variant]
    return timed_epochs(run, epochs)


def alambic_fit(variant: str, train, loader, teacher, student, epochs: int, cache: Path) -> list[float]:
    """(d), (e), (f): alambic's loop; epoch boundaries are read from its per-epoch evaluate callback."""
    from alambic.core.cache import CachedTeacher

    terms = [
        Term(loss="ce", weight=1 - KD_WEIGHT),
        Term(loss="kd", weight=KD_WEIGHT, params={"temperature": TEMPERATURE}),
    ]
    live = Teacher(teacher, terms)
    cached = variant in ("e", "f-bf16", "f-compile")
    source = CachedTeacher(cache, teacher=teacher, dataset=train, terms=terms) if cached else live
    marks = []

    def mark(_student):
        synchronize()
        marks.append(time.perf_counter())
        return {"accuracy": 0.0}

    precision = "bf16" if variant == "f-bf16" else "no"
    started = time.perf_counter()
    settings = LoopSettings(
        epochs=epochs + 1,
        optimizer="sgd",
        lr=0.05,
        weight_decay=5e-4,
        log_every=10**9,
        compile=variant == "f-compile",
        overlap_teacher=variant == "d-overlap",
    )
    fit(
        Distiller(student, terms),
        loader,
        settings,
        accelerator=make_accelerator(precision),
        teacher=source,
        evaluate=mark,
    )
    ends = [started, *marks]
    return [end - start for start, end in zip(ends[1:], ends[2:])]  # the first epoch is the warm-up


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_variant(args) -> None:
    """Child process: time one variant and print one JSON line."""
    train, loader, teacher, student = setting(args)
    if args.variant in ("a", "b", "c"):
        times = plain_loops(args.variant, loader, teacher, student, args.epochs)
    else:
        times = alambic_fit(args.variant, train, loader, teacher, student, args.epochs, Path(args.cache))
    print(json.dumps({"variant": args.variant, "epoch_seconds": times, "peak_bytes": peak_bytes()}))


def build_cache(args, folder: Path) -> float:
    from alambic.core.cache import cache_teacher

    train, _, teacher, _ = setting(args)
    started = time.perf_counter()
    cache_teacher(teacher, train, folder, batch_size=512, device=DEVICE)
    synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", choices=sorted(PAIRS))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--subset", type=int, default=None, help="training samples (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if DEVICE.type == "cuda" or v != "d-overlap"),
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole set of variants, interleaved")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return one_variant(args)

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        build_seconds = build_cache(args, cache)
        results: dict[str, dict] = {}
        for _round in range(args.rounds):  # rounds interleave the variants, so drift on the machine hits all
            for variant in args.variants.split(","):
                command = [
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--variant",
                    variant,
                    "--cache",
                    str(cache),
                ]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                record = json.loads(output.strip().splitlines()[-1])
                result = results.setdefault(variant, {"epoch_seconds": [], "peak_bytes": 0})
                result["epoch_seconds"] += record["epoch_seconds"]
                result["peak_bytes"] = max(result["peak_bytes"], record["peak_bytes"])
                result["median"] = statistics.median(result["epoch_seconds"])
                print(f"{variant}: {VARIANTS[variant]}: {result['median']:.2f} s/epoch", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    print(
        f"\n{args.pair}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"{args.subset or 'all'} training samples, batch {args.batch_size}, median of {args.rounds} x {args.epochs} epochs, each run after 1 warm-up\n"
    )
    print("| variant | s / epoch | peak memory MiB |\n|---|---:|---:|")
    for variant, result in results.items():
        print(
            f"| ({variant}) {VARIANTS[variant]} | {result['median']:.3f} | {result['peak_bytes'] / 2**20:,.0f} |"
        )
    median = {variant: result["median"] for variant, result in results.items()}
    print()
    if {"c", "d"} <= set(median):
        print(f"d / c (framework overhead, goal <= 1.05): {median['d'] / median['c']:.3f}")
    if {"a", "b", "d"} <= set(median):
        print(f"d / (a + b) (online limit, goal <= 1.10): {median['d'] / (median['a'] + median['b']):.3f}")
    if {"a", "e"} <= set(median):
        print(f"e / a (offline limit, goal <= 1.10): {median['e'] / median['a']:.3f}")
        for variant in ("f-bf16", "f-compile"):
            if variant in median:
                print(f"{variant} / a: {median[variant] / median['a']:.3f}")
    if {"d", "d-overlap"} <= set(median):
        print(f"d-overlap / d: {median['d-overlap'] / median['d']:.3f}")
    if {"d", "e"} <= set(median):
        from alambic.core.cache import epochs_to_pay_off

        print(
            f"cache build: {build_seconds:.2f} s; pays for itself after "
            f"{epochs_to_pay_off(build_seconds, median['d'], median['e']):.2f} epochs"
        )


if __name__ == "__main__":
    main()
