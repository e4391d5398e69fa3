"""Settings of text augmentation for distillation (:mod:`alambic.data.augment`): probabilities, copies, seed.

Defaults are Tang et al. 2019's (p_mask = p_pos = 0.1, p_ng = 0.25, n-grams up to 5, 20 draws per sentence)
and TinyBERT's 15 neighbours to choose from.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from alambic.config.base import StrictModel, format_validation_error
from alambic.errors import ConfigError


class AugmentSettings(StrictModel):
    """What :func:`alambic.data.augment.augment_texts` takes besides the texts and the teacher."""

    copies: int = Field(20, ge=1, le=1000)  # draws per sentence; duplicates are dropped
    mask: float = Field(0.1, ge=0, le=1)  # per word: replaced by the mask token
    neighbours: float = Field(0.1, ge=0, le=1)  # per word: replaced by a nearest token in the embeddings
    ngram: float = Field(0.25, ge=0, le=1)  # per draw: only an n-gram of it is kept
    k: int = Field(15, ge=1)  # nearest tokens to choose from
    max_ngram: int = Field(5, ge=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_choice_per_word(self) -> AugmentSettings:
        if self.mask + self.neighbours > 1:
            raise ValueError(
                f"mask + neighbours is a word's chance to change and must be <= 1, got "
                f"{self.mask} + {self.neighbours}"
            )
        return self


def augment_settings(**values: Any) -> AugmentSettings:
    """:class:`AugmentSettings` from keyword values, or a one-line :class:`ConfigError` naming each bad one."""
    try:
        return AugmentSettings(**values)
    except ValidationError as error:
        message = format_validation_error(error).removeprefix("(top level): ")
        raise ConfigError(f"augmentation settings: {message}") from None
