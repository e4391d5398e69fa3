"""``strategy``: distillation beyond one frozen teacher (ensembles, mutual learning, born-again
networks, teacher assistants, self-distillation)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from alambic.config.base import ModelConfig, StrictModel, Term, TrainConfig
from alambic.losses import get_loss_spec


class StrategyConfig(StrictModel):
    """What every strategy tells the run config's checks, instead of the run comparing kind names.

    ``teacher_free``: the strategy makes its own targets (a ``teacher`` section is optional and only
    evaluated; a transfer set, which a teacher labels, is refused). ``brings_teachers``: the strategy's
    own teachers replace the ``teacher`` section and train in the ``teacher`` stage.
    """

    teacher_free: ClassVar[bool] = False
    brings_teachers: ClassVar[bool] = False

    def check_run(self, run: Any) -> None:
        """Raise ``ValueError`` for what this strategy refuses in the whole run config ``run``."""


class EnsembleStrategy(StrategyConfig):
    """Several teachers as one: their averaged softened outputs, or one model of their averaged weights."""

    kind: Literal["ensemble"]
    brings_teachers: ClassVar[bool] = True
    teachers: list[ModelConfig] = Field(min_length=2)
    train: TrainConfig | None = None  # trains the teachers without a checkpoint (ce, data order seed + k)
    fusion: Literal["outputs", "weights"] = "outputs"
    weighting: Literal["fixed", "confidence", "entropy"] = "fixed"  # per-sample correctness: ensemble_kd
    weights: list[float] | None = None  # fixed weights, one per teacher (equal by default)
    temperature: float | None = Field(None, gt=0)  # of the average; default: the distill terms' temperature

    def check_run(self, run: Any) -> None:
        if any(model.checkpoint is None for model in self.teachers) and "teacher" not in run.stages:
            raise ValueError(
                "strategy.teachers without a checkpoint train in the 'teacher' stage; add it to stages"
            )

    @model_validator(mode="after")
    def _sources(self) -> EnsembleStrategy:
        if self.train is None and any(model.checkpoint is None for model in self.teachers):
            raise ValueError("give every teacher a checkpoint, or strategy.train to train those without one")
        if self.weights is not None and len(self.weights) != len(self.teachers):
            raise ValueError(f"weights: one per teacher ({len(self.teachers)}), got {len(self.weights)}")
        return self


class MutualStrategy(StrategyConfig):
    """Deep Mutual Learning: the student and its peers trained together, each distilled from the others."""

    kind: Literal["mutual"]
    teacher_free: ClassVar[bool] = True
    peers: list[ModelConfig] = Field(min_length=1)  # trained beside the student (peer 0)
    # each peer's own terms, student first (online KD: a still-training teacher on [ce]); default distill.terms
    peer_terms: list[list[Term]] | None = None
    alternate: bool = False  # one peer updated per step, in turn (DML's Algorithm 1; "implicit" online KD)

    def check_run(self, run: Any) -> None:
        if self.alternate and run.distill.train.grad_accum != 1:
            raise ValueError(
                "strategy.alternate takes one peer per optimizer step: set distill.train.grad_accum: 1"
            )


class BornAgainStrategy(StrategyConfig):
    """Born-again networks: generation k is distilled from generation k - 1 (the first from the teacher)."""

    kind: Literal["born_again"]
    generations: int = Field(2, ge=1)  # the last generation is the run's distilled student


class AssistantsStrategy(StrategyConfig):
    """Teacher assistants: teacher -> assistant 1 -> ... -> student, each distilled from the one before."""

    kind: Literal["assistants"]
    assistants: list[ModelConfig] = Field(min_length=1)
    train: TrainConfig | None = None  # of every assistant; default distill.train


class SelfDistillStrategy(StrategyConfig):
    """Be Your Own Teacher: classifier heads on intermediate modules, distilled from the deepest output."""

    kind: Literal["self_distill"]
    teacher_free: ClassVar[bool] = True
    exits: list[str] = Field(min_length=1)  # module paths, e.g. [hidden.0, hidden.1] or [layer1, layer2]
    temperature: float = Field(3.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)

    def check_run(self, run: Any) -> None:
        if any(get_loss_spec(term.loss).needs_teacher for term in run.distill.terms):
            raise ValueError(
                "self_distill: the deepest exit trains on teacher-free distill.terms, such as [ce]"
            )


Strategy = Annotated[
    EnsembleStrategy | MutualStrategy | BornAgainStrategy | AssistantsStrategy | SelfDistillStrategy,
    Field(discriminator="kind"),
]

STRATEGIES: dict[str, type[StrategyConfig]] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls
    for cls in (EnsembleStrategy, MutualStrategy, BornAgainStrategy, AssistantsStrategy, SelfDistillStrategy)
}
TEACHER_FREE_STRATEGIES = tuple(kind for kind, cls in STRATEGIES.items() if cls.teacher_free)


def strategy_class(kind: str) -> type[StrategyConfig]:
    """The config class of ``strategy.kind``."""
    return STRATEGIES[kind]
