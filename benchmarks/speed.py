"""What distillation costs against its limits, side by side in one run (issue 5).

For one teacher / student pair, on the same data, batch size and loader, it times an epoch of:

  (a) the student trained alone, a plain PyTorch loop (the offline limit)
  (b) the teacher's forward pass alone over the data
  (c) a minimal hand-written PyTorch KD loop (the reference: no framework)
  (d) alambic online KD (``fit`` with a live teacher)
  (e) alambic with a cached teacher (``cache-teacher``, then ``CachedTeacher``)
  (f) (e) with bf16 autocast, and (e) with ``torch.compile``
  (d-overlap) (d) with the teacher's forward on a second CUDA stream (GPU only)
  (d-bf16) (d) with bf16 autocast; (d-graphs) (d) with ``cuda_graphs`` (GPU only)

and whole calls, setup included, the same epochs (``--epochs`` + 1) on the user's own ``DataLoader``:

  (whole-c) a hand-written KD loop, optimizer built inside   (whole-d) one ``distill()`` call
  (whole-a) the student alone through ``DataLoader(dataset)``
  (whole-e) one ``distill()`` call with a ``CachedTeacher`` through ``DataLoader(IndexedDataset(dataset))``

and, once per run, ``import alambic`` against ``import torch`` (fresh interpreters, median of 5) and the
cold start: in a fresh process, the first call's extra time over a second, identical one, for a short
``distill()`` and for a short hand-written loop (PyTorch's own first optimizer step imports
``torch._dynamo``), in both orders; what alambic adds is its first call's extra (distill first) less
the hand loop's (hand first).

Each variant runs in its own process (so its peak memory is its own): one warm-up epoch, then the
median of ``--epochs`` timed epochs, in wall time and in process CPU time (steadier on a shared
machine). It prints the ratios with the goals of issue 18: d / c (framework overhead), d / (a + b)
(distance from the online limit), e / a (distance from the offline limit), whole-d / whole-c,
whole-e / whole-a, the cold start, the cache's build time and the epochs it takes to pay for itself.

    OMP_NUM_THREADS=1 python benchmarks/speed.py mnist-tiny --data-dir ../shared/data/mnist --rounds 2
    OMP_NUM_THREADS=1 python benchmarks/speed.py mnist-mlp --data-dir ../shared/data/mnist --rounds 2
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
from torch.utils.data import DataLoader, TensorDataset

PAIRS = {
    # where only overhead is left: 784-128-10 teacher, 784-32-10 student
    "mnist-tiny": ("mnist", ("mlp", {"hidden": [128]}), ("mlp", {"hidden": [32]})),
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
    "d-bf16": "alambic online KD + bf16 autocast",
    "d-graphs": "alambic online KD + cuda_graphs",
    "whole-a": "whole call: student alone, DataLoader(dataset)",
    "whole-c": "whole call: hand-written KD loop",
    "whole-d": "whole call: distill()",
    "whole-e": "whole call: distill(CachedTeacher), DataLoader(IndexedDataset)",
}
GPU_ONLY = ("d-overlap", "d-graphs")
CACHED = ("e", "f-bf16", "f-compile")
WHOLE = ("whole-a", "whole-c", "whole-d", "whole-e")


def setting(args):
    from alambic.data import IndexedDataset, build_datasets
    from alambic.data.loaders import make_loader
    from alambic.models import build_model

    dataset, teacher_spec, student_spec = PAIRS[args.pair]
    train, _, info = build_datasets(dataset, data_dir=args.data_dir, train_subset=args.subset, seed=0)
    loader = make_loader(IndexedDataset(train), batch_size=args.batch_size, shuffle=True, seed=0)
    torch.manual_seed(0)
    teacher = build_model(teacher_spec[0], input_shape=info.input_shape, num_classes=10, **teacher_spec[1])
    student = build_model(student_spec[0], input_shape=info.input_shape, num_classes=10, **student_spec[1])
    return train, loader, teacher.to(DEVICE), student.to(DEVICE)


def kd_terms():
    from alambic.config import Term

    return [
        Term(loss="ce", weight=1 - KD_WEIGHT),
        Term(loss="kd", weight=KD_WEIGHT, params={"temperature": TEMPERATURE}),
    ]


def synchronize() -> None:
    """Wait for the GPU's queued work, so that wall-clock time covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds, after the GPU's queued work."""
    synchronize()
    return time.perf_counter(), time.process_time()


def timed_epochs(run_epoch, epochs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each epoch after one warm-up epoch."""
    run_epoch(0)
    wall, cpu = [], []
    for epoch in range(1, epochs + 1):
        started = clocks()
        run_epoch(epoch)
        ended = clocks()
        wall.append(ended[0] - started[0])
        cpu.append(ended[1] - started[1])
    return wall, cpu


def hand_optimizer(student):
    fused = {"fused": True} if DEVICE.type == "cuda" else {}  # what a user would pick on a GPU
    return torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, **fused)


def hand_kd_loss(logits, teacher_logits, labels):
    """The reference KD loss, written as a user would: (1 - w) CE + w T^2 KL(teacher || student)."""
    soft = F.kl_div(
        F.log_softmax(logits / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - KD_WEIGHT) * F.cross_entropy(logits, labels) + KD_WEIGHT * TEMPERATURE**2 * soft


def hand_epoch(loader, teacher, student, optimizer, *, with_teacher: bool) -> None:
    """One epoch of the hand-written loop: KD with a live teacher, or the student alone (CE)."""
    for batch in loader:
        images, labels = batch[0].to(DEVICE, non_blocking=True), batch[1].to(DEVICE, non_blocking=True)
        logits = student(images)
        if with_teacher:
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = hand_kd_loss(logits, teacher_logits, labels)
        else:
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def plain_loops(variant: str, loader, teacher, student, epochs: int):
    """(a), (b) and (c): what a user writes without a framework."""
    optimizer = hand_optimizer(student)
    teacher.eval().requires_grad_(False)

    @torch.no_grad()
    def teacher_forward(epoch):
        loader.sampler.set_epoch(epoch)
        for images, _, _ in loader:
            teacher(images.to(DEVICE, non_blocking=True))

    def loop(epoch):
        loader.sampler.set_epoch(epoch)
        hand_epoch(loader, teacher, student, optimizer, with_teacher=variant == "c")

    student.train()
    return timed_epochs(teacher_forward if variant == "b" else loop, epochs)


def alambic_fit(variant: str, train, loader, teacher, student, epochs: int, cache: Path):
    """(d), (e), (f): alambic's loop; epoch boundaries are read from its per-epoch evaluate callback."""
    from alambic.config import LoopSettings
    from alambic.core.cache import CachedTeacher
    from alambic.core.distiller import Distiller, Teacher
    from alambic.core.loop import fit
    from alambic.core.optim import make_accelerator

    terms = kd_terms()
    live = Teacher(teacher, terms)
    source = CachedTeacher(cache, teacher=teacher, dataset=train, terms=terms) if variant in CACHED else live
    marks = []

    def mark(_student):
        marks.append(clocks())
        return {"accuracy": 0.0}

    precision = "bf16" if variant in ("f-bf16", "d-bf16") else "no"
    started = clocks()
    settings = LoopSettings(
        epochs=epochs + 1,
        optimizer="sgd",
        lr=0.05,
        weight_decay=5e-4,
        log_every=10**9,
        compile=variant == "f-compile",
        overlap_teacher=variant == "d-overlap",
        cuda_graphs=variant == "d-graphs",
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
    pairs = list(zip(ends[1:], ends[2:]))  # the first epoch is the warm-up
    return [end[0] - start[0] for start, end in pairs], [end[1] - start[1] for start, end in pairs]


def whole_call(variant: str, args, cache: Path) -> tuple[float, float]:
    """(whole-*): one call, setup included, over ``epochs + 1`` epochs of the user's own DataLoader."""
    from alambic import CachedTeacher, IndexedDataset, distill

    train, _, teacher, student = setting(args)
    dataset = IndexedDataset(train) if variant == "whole-e" else train
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        generator=generator,
        pin_memory=DEVICE.type == "cuda",
    )
    epochs = args.epochs + 1
    started = clocks()
    if variant in ("whole-a", "whole-c"):
        teacher.eval().requires_grad_(False)
        optimizer = hand_optimizer(student)
        for _ in range(epochs):
            hand_epoch(loader, teacher, student, optimizer, with_teacher=variant == "whole-c")
    else:
        terms = kd_terms()
        source = (
            CachedTeacher(cache, teacher=teacher, dataset=train, terms=terms)
            if variant == "whole-e"
            else teacher
        )
        distill(source, student, loader, terms=terms, epochs=epochs, lr=0.05, weight_decay=5e-4,
                log_every=10**9, progress=False)  # fmt: skip
    ended = clocks()
    return ended[0] - started[0], ended[1] - started[1]


def cold_start(order: str) -> dict[str, float]:
    """Child process: first and second call of a short hand loop and of a short ``distill()``, in ``order``.

    Only ``import alambic`` has run before, as in a user's script (so alambic is imported inside this
    file's functions); synthetic data (1024 MNIST-sized rows) and the tiny pair: the calls' own time.
    """
    import alambic

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(1024, 784, generator=generator), torch.randint(0, 10, (1024,), generator=generator)
    )
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=generator)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(
        DEVICE
    )
    student = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(
        DEVICE
    )
    initial = student.state_dict()

    def hand():
        student.load_state_dict(initial)
        hand_epoch(loader, teacher.eval(), student.train(), hand_optimizer(student), with_teacher=True)

    def framework():
        student.load_state_dict(initial)
        alambic.distill(teacher, student, loader, epochs=1, progress=False)

    times = {}
    for name in order.split(","):
        for call in ("first", "second"):
            started = clocks()
            {"hand": hand, "distill": framework}[name]()
            ended = clocks()
            times[f"{name}-{call}"] = ended[0] - started[0]
            times[f"{name}-{call}-cpu"] = ended[1] - started[1]
    return times


def import_times(repeats: int = 5) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds of ``python -c "import X"`` in fresh interpreters, interleaved."""
    import resource

    samples: dict[str, list[tuple[float, float]]] = {"torch": [], "alambic": []}
    for _ in range(repeats):
        for module in samples:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            samples[module].append((wall, cpu))
    return {
        module: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for module, values in samples.items()
    }


def peak_bytes() -> int:
    import resource

    return (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def one_variant(args) -> None:
    """Child process: time one variant (or a cold start) and print one JSON line."""
    if args.variant.startswith("cold:"):
        print(json.dumps(cold_start(args.variant.removeprefix("cold:"))))
        return
    if args.variant in WHOLE:
        wall, cpu = whole_call(args.variant, args, Path(args.cache))
        times, cpu_times = [wall], [cpu]
    else:
        train, loader, teacher, student = setting(args)
        if args.variant in ("a", "b", "c"):
            times, cpu_times = plain_loops(args.variant, loader, teacher, student, args.epochs)
        else:
            times, cpu_times = alambic_fit(
                args.variant, train, loader, teacher, student, args.epochs, Path(args.cache)
            )
    record = {"variant": args.variant, "epoch_seconds": times, "epoch_cpu_seconds": cpu_times}
    print(json.dumps(record | {"peak_bytes": peak_bytes()}))


def build_cache(args, folder: Path) -> float:
    from alambic.core.cache import cache_teacher

    train, _, teacher, _ = setting(args)
    started = time.perf_counter()
    cache_teacher(teacher, train, folder, batch_size=512, device=DEVICE)
    synchronize()
    return time.perf_counter() - started


def child(args, variant: str, cache: Path) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--cache", str(cache)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def ratio(median: dict, cpu: dict, top: str, bottom: str | tuple[str, ...]) -> str:
    """``top / bottom`` in wall time and in CPU time (``bottom`` a variant, or variants summed)."""
    bottoms = (bottom,) if isinstance(bottom, str) else bottom
    wall = median[top] / sum(median[b] for b in bottoms)
    return f"{wall:.3f} (CPU time {cpu[top] / sum(cpu[b] for b in bottoms):.3f})"


def print_ratios(args, median: dict, cpu: dict, build_seconds: float) -> None:
    have = set(median).__ge__
    goal = 1.03 if args.pair == "mnist-tiny" and DEVICE.type != "cuda" else 1.05
    if have({"c", "d"}):
        print(f"d / c (framework overhead per epoch, goal <= {goal}): {ratio(median, cpu, 'd', 'c')}")
    if have({"c", "d-graphs"}):
        print(
            f"d-graphs / c (CUDA graphs against the hand loop, goal <= 0.8): {ratio(median, cpu, 'd-graphs', 'c')}"
        )
    if have({"d", "d-bf16"}):
        print(f"d-bf16 / d: {ratio(median, cpu, 'd-bf16', 'd')}")
    if have({"a", "b", "d"}):
        print(f"d / (a + b) (online limit, goal <= 1.10): {ratio(median, cpu, 'd', ('a', 'b'))}")
    if have({"a", "e"}):
        print(f"e / a (offline limit per epoch, goal <= 1.10): {ratio(median, cpu, 'e', 'a')}")
        for variant in ("f-bf16", "f-compile"):
            if variant in median:
                print(f"{variant} / a: {ratio(median, cpu, variant, 'a')}")
    if have({"whole-c", "whole-d"}):
        print(
            f"whole-d / whole-c (online, whole call, goal <= 1.02): {ratio(median, cpu, 'whole-d', 'whole-c')}"
        )
    if have({"whole-a", "whole-e"}):
        print(
            f"whole-e / whole-a (offline: cached teacher / student alone, whole call, goal <= 1.05): "
            f"{ratio(median, cpu, 'whole-e', 'whole-a')}"
        )
    if have({"d", "d-overlap"}):
        print(f"d-overlap / d: {ratio(median, cpu, 'd-overlap', 'd')}")
    if have({"d", "e"}):
        from alambic.core.cache import epochs_to_pay_off

        print(
            f"cache build: {build_seconds:.2f} s; pays for itself after "
            f"{epochs_to_pay_off(build_seconds, median['d'], median['e']):.2f} epochs"
        )


def startup(args, cache: Path) -> list[str]:
    """Import times and the cold start, printed with the goal of issue 18 (after the table)."""
    imports = import_times()
    (torch_wall, torch_cpu), (ours_wall, ours_cpu) = imports["torch"], imports["alambic"]
    lines = [f"import torch: {torch_wall:.2f} s (CPU {torch_cpu:.2f}); import alambic: {ours_wall:.2f} s "
          f"(CPU {ours_cpu:.2f}); alambic adds {ours_wall - torch_wall:.2f} s (CPU {ours_cpu - torch_cpu:.2f})"]  # fmt: skip
    runs = {order: [child(args, f"cold:{order}", cache) for _ in range(args.rounds)]
            for order in ("hand,distill", "distill,hand")}  # fmt: skip

    def extra(order: str, name: str, suffix: str = "") -> float:
        return statistics.median(
            r[f"{name}-first{suffix}"] - r[f"{name}-second{suffix}"] for r in runs[order]
        )

    for suffix, label in (("", "wall"), ("-cpu", "CPU")):
        torch_own = extra("hand,distill", "hand", suffix)
        distill_first = extra("distill,hand", "distill", suffix)
        after_hand = extra("hand,distill", "distill", suffix)
        lines.append(
            f"cold start ({label}, first call's extra over a second, median of {args.rounds}): hand loop first "
            f"{torch_own:.2f} s (PyTorch's own); distill() first {distill_first:.2f} s; distill() after a hand "
            f"loop {after_hand:.2f} s; alambic adds {distill_first - torch_own:.2f} s (goal <= 0.3)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", choices=sorted(PAIRS))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--subset", type=int, default=None, help="training samples (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if DEVICE.type == "cuda" or v not in GPU_ONLY),
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole set of variants, interleaved")
    parser.add_argument("--skip-startup", action="store_true", help="no import-time and cold-start rows")
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
                record = child(args, variant, cache)
                result = results.setdefault(
                    variant, {"epoch_seconds": [], "epoch_cpu_seconds": [], "peak_bytes": 0}
                )
                result["epoch_seconds"] += record["epoch_seconds"]
                result["epoch_cpu_seconds"] += record["epoch_cpu_seconds"]
                result["peak_bytes"] = max(result["peak_bytes"], record["peak_bytes"])
                result["median"] = statistics.median(result["epoch_seconds"])
                result["cpu"] = statistics.median(result["epoch_cpu_seconds"])
                unit = "s/call" if variant in WHOLE else "s/epoch"
                print(f"{variant}: {VARIANTS[variant]}: {result['median']:.2f} {unit}", flush=True)
        if not args.skip_startup:
            print("measuring import time and cold start ...", flush=True)
            startup_lines = startup(args, cache)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    print(
        f"\n{args.pair}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"{args.subset or 'all'} training samples, batch {args.batch_size}, median of {args.rounds} x {args.epochs} epochs, each run after 1 warm-up; "
        f"whole calls: {args.epochs + 1} epochs, setup included, median of {args.rounds}\n"
    )
    print("| variant | s / epoch (whole: s / call) | CPU s | peak memory MiB |\n|---|---:|---:|---:|")
    for variant, result in results.items():
        print(
            f"| ({variant}) {VARIANTS[variant]} | {result['median']:.3f} | {result['cpu']:.3f} | "
            f"{result['peak_bytes'] / 2**20:,.0f} |"
        )
    print()
    median = {variant: result["median"] for variant, result in results.items()}
    cpu = {variant: result["cpu"] for variant, result in results.items()}
    print_ratios(args, median, cpu, build_seconds)
    if not args.skip_startup:
        print("\n".join(["", *startup_lines]))


if __name__ == "__main__":
    main()
