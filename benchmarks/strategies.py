"""Every strategy recipe against plain KD on one setting, over several seeds: the strategy table of BENCHMARKS.md.

Each recipe of ``recipes/strategies/`` (and ``recipes/digits.yaml``, plain KD) runs through the same
code path as ``alambic run``, with one budget for every training stage. By default on digits; with
``--dataset mnist --data-dir DIR --subset N`` on an N-image, class-stratified MNIST subset (all
10,000 test images). Results go to ``OUT/results.jsonl`` (one line per run; a finished run is not
run again); ``--table`` prints the markdown table. ``--tune N`` adds the tuned rows: per seed, ``alambic
tune`` searches plain KD's config for N trials on a validation split of that seed's training set,
then the best config runs as any recipe (``--max-size-mb`` adds a budget-mode row).

    OMP_NUM_THREADS=1 python benchmarks/strategies.py --dataset mnist --data-dir ../shared/data/mnist \
        --subset 2000 --epochs 20 --seeds 0 1 2 --out /tmp/strategies
    python benchmarks/strategies.py --out /tmp/strategies --table
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from alambic.config import config_from_dict, read_config_file
from alambic.run.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "plain KD": "digits.yaml",
    "ensemble (outputs, equal weights)": "strategies/ensemble.yaml",
    "ensemble (ensemble_kd, per-sample correctness)": "strategies/ensemble-correct.yaml",
    "weight average of 3 teachers": "strategies/weight-average.yaml",
    "mutual learning (DML, 2 peers)": "strategies/mutual.yaml",
    "online KD (teacher trained alongside)": "strategies/online-kd.yaml",
    "born-again, 3 generations": "strategies/born-again.yaml",
    "teacher assistant (128)": "strategies/assistants.yaml",
    "self-distillation (BYOT exits)": "strategies/self-distill.yaml",
    "augmentation-consistent KD (mixup)": "strategies/mixup.yaml",
}


def recipe_config(
    path: Path, *, dataset: str, data_dir: str | None, subset: int | None, epochs: int, seed: int
):
    """The recipe with the benchmark's data, seed and one epoch budget for every stage it trains."""
    data = read_config_file(path)
    data["seed"] = seed
    data["data"] = {**data.get("data", {}), "dataset": dataset, "eval_batch_size": 1000}
    if data_dir:
        data["data"]["data_dir"] = data_dir
    if subset:
        data["data"]["train_subset"] = subset
    sections = [data.get("teacher"), data.get("distill"), data.get("baseline"), data.get("strategy")]
    for section in sections:
        if isinstance(section, dict) and isinstance(section.get("train"), dict):
            section["train"]["epochs"] = epochs
    data["evaluate"] = {"latency_repeats": 5, "batch_sizes": [1]}
    data["stages"] = [
        stage
        for stage in data.get("stages", ["teacher", "baseline", "distill", "evaluate"])
        if stage != "report"
    ]
    return config_from_dict(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--subset", type=int)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="recipe files to run (default: all)")
    parser.add_argument("--out", default="runs/strategies")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--tune", type=int, default=0, help="trials of the tuned rows (0: no tuning)")
    parser.add_argument("--max-size-mb", type=float, help="budget of the budget-mode tuned row")
    args = parser.parse_args()
    out = Path(args.out)
    results_path = out / "results.jsonl"
    if args.table:
        return print_table(results_path)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["recipe"], r["seed"]) for r in _read(results_path)}
    jobs = [(label, recipe) for label, recipe in RECIPES.items() if not args.only or recipe in args.only]
    if args.tune:
        jobs.append((f"tuned KD ({args.tune} trials)", "tune"))
        if args.max_size_mb:
            jobs.append(
                (f"tuned KD + student size under {args.max_size_mb} MB ({args.tune} trials)", "tune-budget")
            )
    for label, recipe in jobs:
        for seed in args.seeds:
            if (recipe, seed) in done:
                continue
            source = "digits.yaml" if recipe.startswith("tune") else recipe
            config = recipe_config(
                ROOT / "recipes" / source,
                dataset=args.dataset,
                data_dir=args.data_dir,
                subset=args.subset,
                epochs=args.epochs,
                seed=seed,
            )
            if recipe.startswith("tune"):
                config = _tuned(
                    config, out / f"{recipe}-study-seed{seed}", args, budget=recipe == "tune-budget"
                )
            run_dir = out / f"{Path(recipe).stem}-seed{seed}"
            run(config, run_dir=run_dir, resume=(run_dir / "config.yaml").is_file())
            summary = json.loads((run_dir / "summary.json").read_text())
            record = {
                "label": label,
                "recipe": recipe,
                "seed": seed,
                "dataset": args.dataset,
                "subset": args.subset,
                "epochs": args.epochs,
                "accuracy": {name: model["accuracy"] for name, model in summary["models"].items()},
                "parameters": {name: model["parameters"] for name, model in summary["models"].items()},
                "seconds": summary["stages_seconds"],
            }
            with open(results_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(label, seed, {k: round(100 * v, 2) for k, v in record["accuracy"].items()}, flush=True)


def _tuned(config, study_dir: Path, args, *, budget: bool):
    """The best config of an ``alambic tune`` study over ``config`` (its stages, seed and data kept)."""
    from alambic.config import load_config
    from alambic.run.tune import tune

    result = tune(
        config, trials=args.tune, study_dir=study_dir, max_size_mb=args.max_size_mb if budget else None
    )
    print("best", result["best_params"], result["best_student"], flush=True)
    return load_config(result["best_config"])


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.2f}{spread}"


def print_table(path: Path) -> None:
    records = _read(path)
    print(
        "| strategy | recipe | seeds | teacher acc % | baseline acc % | student acc % | student params "
        "| student-side train s | other models, acc % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    labels = {**RECIPES, **{r["label"]: r["recipe"] for r in records if r["recipe"].startswith("tune")}}
    for label, recipe in labels.items():
        rows = [r for r in records if r["recipe"] == recipe]
        if not rows:
            continue
        teachers = [v for r in rows for k, v in r["accuracy"].items() if k == "teacher"]
        student_side = [
            sum(s for k, s in r["seconds"].items() if not k.startswith("teacher") and k != "baseline")
            for r in rows
        ]
        print(
            f"| {label} | {'`alambic tune`' if recipe.startswith('tune') else f'`recipes/{recipe}`'} | {len(rows)} | {_mean_std(teachers) or '-'} "
            f"| {_mean_std([r['accuracy']['baseline'] for r in rows if 'baseline' in r['accuracy']])} "
            f"| **{_mean_std([r['accuracy']['distilled'] for r in rows])}** | {' / '.join(f'{n:,}' for n in sorted({r['parameters']['distilled'] for r in rows}))} "
            f"| {statistics.mean(student_side):.0f} | {_others(rows)} |"
        )


def _others(rows: list[dict]) -> str:
    """Mean accuracy of the models beyond teacher, baseline and student (members, peers, generations)."""
    names = [name for name in rows[0]["accuracy"] if name not in ("teacher", "baseline", "distilled")]
    return ", ".join(
        f"{name} {100 * statistics.mean(r['accuracy'][name] for r in rows):.2f}" for name in names
    )


if __name__ == "__main__":
    main()
