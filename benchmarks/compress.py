"""Record the compression benchmarks of BENCHMARKS.md: int8 against float32 students and the teacher.

Runs ``alambic compress`` (:func:`alambic.run.compress.compress_run`) on a run directory in several variants
and prints one markdown table per variant plus the int8 / float32 ratios. Speed numbers belong here,
never in tests.

    # MNIST: a run directory with a distilled MLP student (alambic run recipes/mnist-demo.yaml ...)
    python benchmarks/compress.py mnist --run-dir RUN_DIR [--variants ptq-static,ptq-dynamic,qat,chain]
    # CIFAR-10: builds a run directory from the pretrained ResNet-56 (teacher) and ResNet-20 (student)
    python benchmarks/compress.py cifar10 --data-dir ../shared/data/cifar10-jpeg \\
        --weights ../shared/data/weights/cifar10-resnet-akamaster --out /tmp/bench-compress
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from alambic.run.compress import compress_run

# variant -> overrides of the compress section (on top of --set)
VARIANTS = {
    "ptq-static": ["compress.stages=[quantize, export]", "compress.quantize.method=static"],
    "ptq-dynamic": ["compress.stages=[quantize, export]", "compress.quantize.method=dynamic"],
    "qat": ["compress.stages=[quantize, export]", "compress.quantize.qat=true"],
    "chain": ["compress.stages=[prune, recover, quantize, export]", "compress.prune.method=channel"],
}


def cifar_run_dir(out: Path, data_dir: str, weights: Path) -> Path:
    """A run directory whose student is akamaster's pretrained ResNet-20 and teacher the ResNet-56."""
    from alambic.config import dump_config, load_config
    from alambic.core.checkpoint import atomic_write_text, save_weights
    from alambic.models import build_model, load_weights

    run_dir = out / "cifar10-resnet20-pretrained"
    config = load_config(
        "recipes/cifar10-resnet56-resnet20.yaml",
        [
            f"data.data_dir={data_dir}",
            f"teacher.model.checkpoint={(weights / 'resnet56-4bfd9763.th').resolve()}",
            "name=cifar10-resnet20-pretrained",
        ],
    )
    student = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    load_weights(student, weights / "resnet20-12fca82f.th")
    save_weights(student, run_dir / "student" / "model.safetensors")
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    return run_dir


def _ratios(rows: dict) -> list[str]:
    float_row = rows.get("qat") or rows.get("recovered") or rows["distilled"]
    int8, distilled, lines = rows["int8"], rows["distilled"], []
    for size in ("1", "64"):
        lines.append(
            f"- batch {size}: int8 onnxruntime {int8['onnxruntime_latency_ms'][size]:.3g} ms; float32 student "
            f"onnxruntime {distilled['onnxruntime_latency_ms'][size]:.3g} ms "
            f"({distilled['onnxruntime_latency_ms'][size] / int8['onnxruntime_latency_ms'][size]:.2f}x), "
            f"PyTorch {distilled['latency_ms'][size]:.3g} ms "
            f"({distilled['latency_ms'][size] / int8['onnxruntime_latency_ms'][size]:.2f}x)"
        )
    lines.append(
        f"- size: int8 ONNX {int8['size_bytes']:,} B; float32 safetensors {distilled['size_bytes']:,} B "
        f"({distilled['size_bytes'] / int8['size_bytes']:.2f}x), float32 ONNX {distilled['onnx_size_bytes']:,} B "
        f"({distilled['onnx_size_bytes'] / int8['size_bytes']:.2f}x)"
    )
    lines.append(
        f"- accuracy: int8 {100 * int8['accuracy']:.2f}% vs float32 student {100 * distilled['accuracy']:.2f}% "
        f"({100 * (int8['accuracy'] - distilled['accuracy']):+.2f} points; quantized from the "
        f"{100 * float_row['accuracy']:.2f}% float model before it)"
    )
    return lines


def interleaved_latency(
    run_dir: Path, folder: Path, rows: dict, *, repeats: int, data_dir: str | None
) -> list[str]:
    """Median ms of the float ONNX models, the int8 one and the PyTorch student, timed round-robin.

    On a shared machine the load drifts; timing the models in turn, one run each per round, exposes them
    to the same drift, so their ratio is fairer than that of measurements taken minutes apart.
    """
    import statistics
    import time

    from alambic.compress.export import onnx_session
    from alambic.run.artifacts import load_run_model

    student = load_run_model(run_dir, data_dir=data_dir)
    example = student.test_set[0][0].unsqueeze(0)
    names = [name for name in ("teacher", "distilled", "recovered", "qat") if name in rows]
    paths = {f"{name} fp32 ORT": folder / "onnx" / f"{name}.onnx" for name in names}
    paths["int8 ORT"] = folder / "onnx" / "int8.onnx"
    sessions = {label: onnx_session(path, threads=1) for label, path in paths.items()}
    lines = [
        f"Round-robin timing, {repeats} rounds, 1 thread (median ms per batch):",
        "",
        "| batch | " + " | ".join([*sessions, "distilled fp32 PyTorch"]) + " |",
        "|---:|" + "---:|" * (len(sessions) + 1),
    ]
    torch.set_num_threads(1)
    speedups = []
    for size in (1, 64):
        batch = example.repeat(size, *([1] * (example.ndim - 1)))
        runners = {
            label: (lambda s=s, b=batch.numpy(): s.run(None, {s.get_inputs()[0].name: b}))
            for label, s in sessions.items()
        }
        runners["distilled fp32 PyTorch"] = lambda b=batch: student.model(b)
        timings = {label: [] for label in runners}
        with torch.inference_mode():
            for round_index in range(repeats + 3):
                for label, run in runners.items():
                    start = time.perf_counter()
                    run()
                    if round_index >= 3:  # warm-up rounds
                        timings[label].append((time.perf_counter() - start) * 1000)
        medians = {label: statistics.median(values) for label, values in timings.items()}
        lines.append(f"| {size} | " + " | ".join(f"{medians[label]:.3g}" for label in runners) + " |")
        speedups.append(
            f"- batch {size}: int8 is {medians['distilled fp32 ORT'] / medians['int8 ORT']:.2f}x faster than the "
            f"float32 student in onnxruntime, {medians['distilled fp32 PyTorch'] / medians['int8 ORT']:.2f}x than "
            "it in PyTorch"
            + (
                f", {medians['teacher fp32 ORT'] / medians['int8 ORT']:.2f}x than the teacher in onnxruntime"
                if "teacher fp32 ORT" in medians
                else ""
            )
        )
    return [*lines, "", *speedups]


def _table(summary: dict) -> list[str]:
    lines = [
        "| model | accuracy % | params | size on disk | MFLOPs | torch ms @1 | torch ms @64 | ORT ms @1 | ORT ms @64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["models"].items():
        torch_ms, ort_ms = row["latency_ms"], row["onnxruntime_latency_ms"]
        lines.append(
            f"| {name} | {100 * row['accuracy']:.2f} | {row['parameters']:,} | {row['size_bytes'] / 1e3:,.1f} kB "
            f"| {row['flops'] / 1e6:.3g} | "
            + " | ".join(f"{torch_ms[s]:.3g}" if s in torch_ms else "—" for s in ("1", "64"))
            + " | "
            + " | ".join(f"{ort_ms[s]:.3g}" for s in ("1", "64"))
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=["mnist", "cifar10"])
    parser.add_argument("--run-dir", help="a run directory with a distilled student (mnist)")
    parser.add_argument("--data-dir")
    parser.add_argument("--weights", help="folder of the pretrained CIFAR-10 ResNets (cifar10)")
    parser.add_argument("--out", default="runs/bench-compress")
    parser.add_argument("--variants", default="ptq-static,ptq-dynamic,qat,chain")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=50, help="rounds of the round-robin latency comparison")
    args = parser.parse_args()

    if args.benchmark == "cifar10":
        run_dir = cifar_run_dir(Path(args.out), args.data_dir, Path(args.weights))
    else:
        run_dir = Path(args.run_dir)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(
        f"`{command}` — {date.today()}, {platform.machine()} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n"
    )
    for variant in args.variants.split(","):
        summary = compress_run(
            run_dir,
            overrides=[*VARIANTS[variant], *args.overrides],
            data_dir=args.data_dir,
            out=run_dir / f"compress-{variant}",
            progress=lambda line, variant=variant: print(
                f"  [{variant}] {line}", file=sys.stderr, flush=True
            ),
        )
        print(f"\n### {summary['run_name']}: {variant} ({summary['models']['int8']['method']})\n")
        print(
            f"{summary['evaluated_samples']:,} test samples; onnxruntime {summary['onnxruntime_version']}\n"
        )
        print("\n".join(_table(summary)))
        print()
        print("\n".join(_ratios(summary["models"])))
        print()
        folder = run_dir / f"compress-{variant}"
        print(
            "\n".join(
                interleaved_latency(
                    run_dir, folder, summary["models"], repeats=args.rounds, data_dir=args.data_dir
                )
            )
        )
        settings = summary["compress"]
        shown = {"stages": settings["stages"], "prune": settings["prune"], "quantize": settings["quantize"]}
        shown["recover_train"] = settings["recover"]["train"]
        print(f"\nsettings: `{json.dumps(shown, separators=(',', ':'))}`", flush=True)


if __name__ == "__main__":
    main()
