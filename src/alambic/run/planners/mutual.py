"""Deep Mutual Learning (``strategy.kind: mutual``): the student (peer 0) and its peers trained together
in the distill stage, each distilled from the others; each peer saved in ``peer_k/``, the student last."""

from __future__ import annotations

from accelerate import PartialState

from alambic.config import RunConfig
from alambic.errors import ConfigError
from alambic.run.plan import (
    Companion,
    Stage,
    baseline_stage,
    build_config,
    distill_stage,
    register_planner,
    teacher_stage,
)
from alambic.strategies.online import MutualDistiller


@register_planner("mutual")
def plan_mutual(config: RunConfig) -> list[Stage]:
    """An optional teacher (evaluated only), the baseline, then the student with its peers."""
    strategy = config.strategy
    peers = [
        Companion(f"peer_{k}", build_config(model, f"peer_{k}"), config.seed + k, model.arch)  # start apart
        for k, model in enumerate(strategy.peers, 1)
    ]

    def trainable(student, peer_models, example):
        if strategy.alternate and PartialState().num_processes > 1:
            raise ConfigError(
                "strategy.alternate leaves the waiting peers without gradients, which DDP refuses; "
                "run it in one process or set alternate: false"
            )
        return MutualDistiller(
            [student, *peer_models], config.distill.terms, strategy.peer_terms, alternate=strategy.alternate
        )

    teacher = teacher_stage(config, required=False)
    distill = distill_stage(config, None, data="train", trainable=trainable, companions=peers)
    return [stage for stage in (teacher, baseline_stage(config), distill) if stage is not None]
