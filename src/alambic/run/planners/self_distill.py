"""Be Your Own Teacher (``strategy.kind: self_distill``): the student with exits on its intermediate
modules, distilled from its deepest output; only the student (no exit) is saved."""

from __future__ import annotations

from alambic.config import RunConfig
from alambic.run.plan import Stage, baseline_stage, distill_stage, register_planner, teacher_stage
from alambic.strategies.online import SelfDistiller


@register_planner("self_distill")
def plan_self_distill(config: RunConfig) -> list[Stage]:
    """An optional teacher (evaluated only), the baseline, then the student with its exits."""
    strategy = config.strategy

    def trainable(student, companions, example):
        return SelfDistiller(
            student,
            strategy.exits,
            example_input=example,
            terms=config.distill.terms,
            temperature=strategy.temperature,
            kd_weight=strategy.kd_weight,
        )

    teacher = teacher_stage(config, required=False)
    distill = distill_stage(config, None, data="train", trainable=trainable)
    return [stage for stage in (teacher, baseline_stage(config), distill) if stage is not None]
