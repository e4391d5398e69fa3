"""The method table of BENCHMARKS.md, in the layout of Tian et al. 2020 (CRD), table 1.

Runs the teacher (evaluated, or trained when the pair has no pretrained one), the student trained
alone, then every method recipe of a pair, all with one schedule, one data subset and one seed per
row; records each run's test accuracy after every epoch (best and last) and its wall time. Results
are appended to ``OUT/results.jsonl``, so two processes can share the work (``--methods``) and a
stopped benchmark resumes where it stopped; ``--table`` prints the markdown table.

    python benchmarks/methods.py cifar10-resnet56-resnet20 --data-dir ../shared/data/cifar10-jpeg \\
        --subset 5000 --epochs 5 --seeds 0 [--methods kd,crd,...]
    python benchmarks/methods.py cifar10-resnet56-resnet20 --out runs/methods --table
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from alambic.config import load_config
from alambic.run.pipeline import run

RECIPES = Path(__file__).resolve().parents[1] / "src" / "alambic" / "recipes"


def _eval_curve(run_dir: Path, stage: str) -> list[float]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r["accuracy"] for r in records if r.get("stage") == stage and r.get("kind") == "eval"]


def _done(out: Path) -> set[tuple[str, int]]:
    path = out / "results.jsonl"
    if not path.is_file():
        return set()
    return {(r["method"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def _record(out: Path, **fields) -> None:
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(fields) + "\n")


def _overrides(args, seed: int, teacher_checkpoint: str | None) -> list[str]:
    overrides = [
        f"data.data_dir={args.data_dir}",
        f"data.train_subset={args.subset}",
        f"seed={seed}",
        f"distill.train.epochs={args.epochs}",
        "distill.train.eval_every=1",
        *args.overrides,
    ]
    if teacher_checkpoint:
        overrides.append(f"teacher.model.checkpoint={teacher_checkpoint}")
    return overrides


def _teacher(args, out: Path, seed: int, evaluate: bool) -> str:
    """The teacher's weights: the pair's pretrained ones, or trained here (once per seed) when it has none."""
    config = load_config(RECIPES / f"{args.pair}.yaml", _overrides(args, seed, None))
    run_dir = out / f"seed{seed}" / "teacher"
    weights = config.teacher.model.checkpoint or str(run_dir / "teacher" / "model.safetensors")
    if not evaluate or ("teacher", seed) in _done(out):
        if not Path(weights).is_file():
            raise SystemExit(f"no teacher weights at {weights}: run with --methods teacher first")
        return weights
    start = time.perf_counter()
    config.stages = ["teacher", "evaluate"]
    run(config, run_dir=run_dir, resume=run_dir.is_dir())
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = _eval_curve(run_dir, "teacher") or [summary["models"]["teacher"]["accuracy"]]
    _record(
        out,
        method="teacher",
        seed=seed,
        curve=curve,
        seconds=time.perf_counter() - start,
        pretrained=bool(config.teacher.model.checkpoint),
    )
    return weights


def _method(args, out: Path, seed: int, method: str, teacher_checkpoint: str) -> None:
    if (method, seed) in _done(out):
        return
    recipe = RECIPES / f"{args.pair}.yaml" if method == "baseline" else RECIPES / args.pair / f"{method}.yaml"
    config = load_config(recipe, _overrides(args, seed, teacher_checkpoint))
    if method == "baseline":
        config.baseline.train = config.distill.train  # the same schedule as every method
    config.stages = ["baseline"] if method == "baseline" else ["teacher", "distill"]
    run_dir = out / f"seed{seed}" / method
    start = time.perf_counter()
    run(config, run_dir=run_dir, resume=run_dir.is_dir())
    stage = "baseline" if method == "baseline" else "distill"
    _record(
        out, method=method, seed=seed, curve=_eval_curve(run_dir, stage), seconds=time.perf_counter() - start
    )


def _table(args, out: Path) -> str:
    results: dict[str, list[dict]] = {}
    for record in map(json.loads, (out / "results.jsonl").read_text().splitlines()):
        results.setdefault(record["method"], []).append(record)
    baseline_last = {r["seed"]: r["curve"][-1] for r in results.get("baseline", [])}
    lines = [
        "| method | best % | last % | last - student alone (same seeds) | seeds | wall s (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    order = ["teacher", "baseline"] + sorted(m for m in results if m not in ("teacher", "baseline"))
    for method in order:
        if method not in results:
            continue
        rows = results[method]
        best = [100 * max(r["curve"]) for r in rows]
        last = [100 * r["curve"][-1] for r in rows]

        def spread(values):
            mean = statistics.mean(values)
            return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"

        paired = [
            100 * (r["curve"][-1] - baseline_last[r["seed"]]) for r in rows if r["seed"] in baseline_last
        ]
        delta = "" if method in ("teacher", "baseline") or not paired else f"{statistics.mean(paired):+.2f}"
        name = {"teacher": "teacher", "baseline": "student alone"}.get(method, method)
        seconds = statistics.mean(r["seconds"] for r in rows)
        lines.append(f"| {name} | {spread(best)} | {spread(last)} | {delta} | {len(rows)} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", choices=sorted(p.stem for p in RECIPES.glob("cifar10-*.yaml")))
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--out", default=None, help="results folder (default runs/methods-PAIR)")
    parser.add_argument("--subset", type=int, default=5000, help="fixed training subset (class-balanced)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--methods", default=None, help="comma-separated method recipes (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--table", action="store_true", help="print the table of what is recorded")
    args = parser.parse_args()
    out = Path(args.out or f"runs/methods-{args.pair}")
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(_table(args, out))
        return
    recipes = sorted(p.stem for p in (RECIPES / args.pair).glob("*.yaml"))
    methods = args.methods.split(",") if args.methods else ["teacher", "baseline", *recipes]
    unknown = sorted(set(methods) - {"teacher", "baseline", *recipes})
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: teacher, baseline, {', '.join(recipes)}")
    print(
        f"{args.pair}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {date.today()}",
        flush=True,
    )
    for seed in map(int, args.seeds.split(",")):
        teacher = _teacher(args, out, seed, evaluate="teacher" in methods)
        for method in methods:
            if method != "teacher":
                _method(args, out, seed, method, teacher)
            print(f"seed {seed} {method} done", flush=True)


if __name__ == "__main__":
    main()
