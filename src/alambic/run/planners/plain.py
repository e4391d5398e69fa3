"""Plain KD (no ``strategy``): the teacher, then per seed the baseline and the distilled student.

With ``seeds: [s0, s1, ...]`` the baseline and distill stages repeat once per seed: the first seed's are
``baseline`` / ``distill`` (folders ``baseline/``, ``student/``), seed ``s`` gives ``baseline-seedS`` and
``distill-seedS`` (folders ``baseline-seedS/``, ``student-seedS/``).
"""

from __future__ import annotations

from alambic.config import RunConfig
from alambic.run.plan import Stage, baseline_stage, distill_stage, register_planner, teacher_stage


@register_planner(None)
def plan_plain(config: RunConfig) -> list[Stage]:
    """Teacher, then baseline and distill once per seed."""
    teacher = teacher_stage(config)
    stages = [teacher] if teacher is not None else []
    for index, seed in enumerate(config.seeds or [config.seed]):
        suffix = "" if index == 0 else f"-seed{seed}"
        stages.append(baseline_stage(config, seed, suffix))
        stages.append(
            distill_stage(
                config,
                name="distill" + suffix,
                model="distilled" + suffix,
                folder="student" + suffix,
                seed=seed,
                repeats="distill" if suffix else None,
            )
        )
    return stages
