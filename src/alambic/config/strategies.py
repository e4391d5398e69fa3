"""``strategy``: distillation beyond one frozen teacher (ensembles, mutual learning, born-again
networks, teacher assistants, self-distillation)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from alambic.config.base import ModelConfig, StrictModel, Term, TrainConfig


class EnsembleStrategy(StrictModel):
    """Several teachers as one: their averaged softened outputs, or one model of their averaged weights."""

    kind: Literal["ensemble"]
    teachers: list[ModelConfig] = Field(min_length=2)
    train: TrainConfig | None = None  # trains the teachers without a checkpoint (ce, data order seed + k)
    fusion: Literal["outputs", "weights"] = "outputs"
    weighting: Literal["fixed", "confidence", "entropy"] = "fixed"  # per-sample correctness: ensemble_kd
    weights: list[float] | None = None  # fixed weights, one per teacher (equal by default)
    temperature: float | None = Field(None, gt=0)  # of the average; default: the distill terms' temperature

    @model_validator(mode="after")
    def _sources(self) -> EnsembleStrategy:
        if self.train is None and any(model.checkpoint is None for model in self.teachers):
            raise ValueError("give every teacher a checkpoint, or strategy.train to train those without one")
        if self.weights is not None and len(self.weights) != len(self.teachers):
            raise ValueError(f"weights: one per teacher ({len(self.teachers)}), got {len(self.weights)}")
        return self


class MutualStrategy(StrictModel):
    """Deep Mutual Learning: the student and its peers trained together, each distilled from the others."""

    kind: Literal["mutual"]
    peers: list[ModelConfig] = Field(min_length=1)  # trained beside the student (peer 0)
    # each peer's own terms, student first (online KD: a still-training teacher on [ce]); default distill.terms
    peer_terms: list[list[Term]] | None = None
    alternate: bool = False  # one peer updated per step, in turn (DML's Algorithm 1; "implicit" online KD)


class BornAgainStrategy(StrictModel):
    """Born-again networks: generation k is distilled from generation k - 1 (the first from the teacher)."""

    kind: Literal["born_again"]
    generations: int = Field(2, ge=1)  # the last generation is the run's distilled student


class AssistantsStrategy(StrictModel):
    """Teacher assistants: teacher -> assistant 1 -> ... -> student, each distilled from the one before."""

    kind: Literal["assistants"]
    assistants: list[ModelConfig] = Field(min_length=1)
    train: TrainConfig | None = None  # of every assistant; default distill.train


class SelfDistillStrategy(StrictModel):
    """Be Your Own Teacher: classifier heads on intermediate modules, distilled from the deepest output."""

    kind: Literal["self_distill"]
    exits: list[str] = Field(min_length=1)  # module paths, e.g. [hidden.0, hidden.1] or [layer1, layer2]
    temperature: float = Field(3.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)


Strategy = Annotated[
    EnsembleStrategy | MutualStrategy | BornAgainStrategy | AssistantsStrategy | SelfDistillStrategy,
    Field(discriminator="kind"),
]


TEACHER_FREE_STRATEGIES = ("mutual", "self_distill")
