"""Several teachers as one (``strategy.kind: ensemble``): each member loaded or trained in its folder
(``teacher_1/``, ...), then fused by outputs or by weights as the run's ``teacher``.

Members share one initialisation (the run's seed: a weight average needs one basin, as in model soups)
and differ by the data order and dropout of their training (seed + k).
"""

from __future__ import annotations

from alambic.config import RunConfig, Term
from alambic.losses import get_loss_spec
from alambic.run.plan import (
    Builder,
    Models,
    Stage,
    baseline_stage,
    build_config,
    distill_stage,
    register_planner,
)
from alambic.strategies.ensemble import EnsembleModel, average_weights


def ensemble_temperature(terms: list[Term]) -> float:
    """The temperature of the first logit term that softens the teacher (its default when not set), else 1."""
    for term in terms:
        spec = get_loss_spec(term.loss)
        if spec.needs_teacher and term.teacher == "logits" and "temperature" in spec.hyper_parameters:
            return float(term.params.get("temperature", spec.hyper_parameters["temperature"]))
    return 1.0


@register_planner("ensemble")
def plan_ensemble(config: RunConfig) -> list[Stage]:
    """The members, their fusion as ``teacher``, the baseline and the distilled student."""
    strategy = config.strategy
    members = [
        Stage(
            name=f"teacher_{k}",
            model=f"teacher_{k}",
            folder=f"teacher_{k}",
            build=build_config(model, f"teacher_{k}"),
            architecture=model.arch,
            settings="teacher",
            terms=[Term(loss="ce")],
            train=strategy.train if model.checkpoint is None else None,
            seed=config.seed,
            train_seed=config.seed + k,
            runs="teacher" in config.stages or model.checkpoint is not None,
            required=True,
            missing=f"teacher_{k} has no checkpoint: add the 'teacher' stage to train it",
        )
        for k, model in enumerate(strategy.teachers, 1)
    ]
    names = [member.model for member in members]
    if strategy.fusion == "weights":
        architecture = f"weight average of {len(members)} {strategy.teachers[0].arch}"

        def fuse(builder: Builder, models: Models):
            return average_weights([models[name] for name in names], strategy.weights)

    else:
        temperature = strategy.temperature or ensemble_temperature(config.distill.terms)
        architecture = f"ensemble of {len(members)} ({strategy.weighting}, T={temperature:g})"

        def fuse(builder: Builder, models: Models):
            return EnsembleModel(
                [models[name] for name in names],
                temperature=temperature,
                weighting=strategy.weighting,
                weights=strategy.weights,
            )

    fused = Stage(
        name="teacher",
        model="teacher",
        folder=None,
        build=fuse,
        architecture=architecture,
        settings="teacher",
    )
    return [*members, fused, baseline_stage(config), distill_stage(config)]
