"""The planners of a run's stages, one module per strategy, registered by ``strategy.kind``.

Importing this package registers every planner; :func:`plan` gives the stages of a config.

Example:
    >>> from alambic.config import load_config
    >>> [stage.name for stage in plan(load_config("recipes/digits.yaml"))]
    ['teacher', 'baseline', 'distill']
"""

from __future__ import annotations

from alambic.config import RunConfig
from alambic.run.plan import Stage, planner_for
from alambic.run.planners import chain, ensemble, mutual, plain, self_distill

__all__ = ["chain", "ensemble", "mutual", "plain", "plan", "self_distill"]


def plan(config: RunConfig) -> list[Stage]:
    """The stages ``config`` runs, in order, from the planner its strategy registered."""
    return planner_for(config)(config)
