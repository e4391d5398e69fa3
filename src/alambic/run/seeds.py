"""Several seeds (``seeds: [0, 1, 2]``): the baseline and distill stages once per seed, and each metric's
mean, standard deviation and count over them, so that a small difference between two models is not over-read.

The first seed's models are the run's ``baseline`` and ``distilled`` (folders ``baseline/``, ``student/``);
seed ``s`` among the others gives ``baseline-seedS`` and ``distilled-seedS`` (folders ``baseline-seedS/``,
``student-seedS/``). Each is one stage of its own, so ``--resume`` loads the finished ones and trains the rest.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from alambic.run.numbers import is_number
from alambic.run.stages import RunContext

# the per-model metrics summarised over seeds (those a model has)
SEED_METRICS = ("accuracy", "macro_f1", "roc_auc", "perplexity", "next_token_accuracy", "kl_to_teacher")


def seed_contexts(context: RunContext) -> list[tuple[str, RunContext]]:
    """``(suffix, context)`` per seed: ``("", ...)`` for the first, ``("-seedS", ...)`` for the others, each
    context's config carrying its seed; one ``("", context)`` when the run has no ``seeds``."""
    seeds = context.config.seeds
    if not seeds:
        return [("", context)]
    return [
        (
            "" if index == 0 else f"-seed{seed}",
            replace(context, config=context.config.model_copy(update={"seed": seed})),
        )
        for index, seed in enumerate(seeds)
    ]


def mean_and_spread(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}``: the sample standard deviation (n - 1), None for one value."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def seed_statistics(models: dict[str, dict], seeds: list[int]) -> dict[str, Any]:
    """``{"seeds": [...], "models": {name: {metric: {"mean", "std", "n"}}}}`` for ``baseline`` and
    ``distilled`` over their per-seed rows in ``models`` (a summary's models)."""
    grouped: dict[str, dict[str, Any]] = {}
    for name in ("baseline", "distilled"):
        rows = [models[key] for key in [name, *(f"{name}-seed{seed}" for seed in seeds[1:])] if key in models]
        if not rows:
            continue
        grouped[name] = {
            metric: mean_and_spread([row[metric] for row in rows])
            for metric in SEED_METRICS
            if all(is_number(row.get(metric)) for row in rows)
        }
    return {"seeds": list(seeds), "models": grouped}
