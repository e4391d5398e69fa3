"""Chains of distill stages: born-again networks and teacher assistants.

Born-again (Furlanello et al. 2018): generation k is distilled from generation k - 1, the first from the
teacher, the last generation being the run's distilled student. Teacher assistants (Mirzadeh et al.
2020): teacher -> assistant 1 -> ... -> student. Each link is saved in its own folder (``generation_1/``,
``assistant_1/``, ...) before the next starts, so ``--resume`` continues a chain where it stopped.
"""

from __future__ import annotations

from alambic.config import RunConfig
from alambic.run.plan import (
    Stage,
    baseline_stage,
    build_config,
    build_student,
    distill_stage,
    register_planner,
    teacher_stage,
)


def _links(config: RunConfig, links: list[tuple]) -> list[Stage]:
    """Teacher, baseline, each link taught by the one before, then the student taught by the last."""
    stages = [stage for stage in (teacher_stage(config), baseline_stage(config)) if stage is not None]
    teacher = "teacher"
    for name, build, architecture, train in links:
        stages.append(
            distill_stage(
                config,
                teacher,
                name=name,
                model=name,
                folder=name,
                build=build,
                architecture=architecture,
                train=train,
            )
        )
        teacher = name
    return [*stages, distill_stage(config, teacher)]


@register_planner("born_again")
def plan_born_again(config: RunConfig) -> list[Stage]:
    """``generations - 1`` generations of the student, then the student itself."""
    arch = config.student.model.arch
    links = [
        (f"generation_{g}", build_student, arch, config.distill.train)
        for g in range(1, config.strategy.generations)
    ]
    return _links(config, links)


@register_planner("assistants")
def plan_assistants(config: RunConfig) -> list[Stage]:
    """Each assistant (trained with ``strategy.train``, default ``distill.train``), then the student."""
    strategy = config.strategy
    links = [
        (
            f"assistant_{k}",
            build_config(model, f"assistant_{k}"),
            model.arch,
            strategy.train or config.distill.train,
        )
        for k, model in enumerate(strategy.assistants, 1)
    ]
    return _links(config, links)
