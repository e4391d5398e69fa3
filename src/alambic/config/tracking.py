"""Experiment trackers (TensorBoard, W&B, MLflow, ... through Hugging Face Accelerate): which ones, and
how their projects and runs are named."""

from __future__ import annotations

from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from pydantic import Field, field_validator, model_validator

from alambic.config.base import StrictModel

TRACKERS = tuple(
    sorted(LOGGER_TYPE_TO_CLASS)
)  # what Accelerate supports: aim, clearml, comet_ml, mlflow, ...


class TrackingConfig(StrictModel):
    """The trackers a run logs to; ``tracking: [tensorboard, wandb]`` is short for ``{trackers: [...]}``.

    Each training stage (teacher, baseline, distill, a strategy's members) is one tracker run, named
    ``RUN_NAME/STAGE`` and grouped by ``RUN_NAME``, with the same keys in every stage (``train/total``,
    ``train/kd``, ``train/lr``, ``eval/accuracy``, ``eval/loss``, ``epoch``), so stages overlay in one chart.
    """

    trackers: list[str] = Field(default_factory=list)
    project: str | None = (
        None  # W&B project, MLflow experiment; default: the run's name ("alambic" in distill())
    )
    run_name: str | None = None  # default: the run directory's name
    # per tracker, passed to its init (wandb.init, MLflowTracker, SummaryWriter): {wandb: {entity: me, tags: [a]}}
    init_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"trackers": [data]}
        return {"trackers": data} if isinstance(data, list) else data

    @field_validator("trackers")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKERS)}")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _kwargs_of_chosen_trackers(self) -> TrackingConfig:
        stray = sorted(set(self.init_kwargs) - set(self.trackers))
        if stray:
            raise ValueError(
                f"init_kwargs for {stray[0]!r}, which is not in trackers {self.trackers}: add it"
            )
        return self
