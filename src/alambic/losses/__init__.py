"""Distillation losses and their registry. Importing this package registers every built-in loss."""

from alambic.losses import ensemble, feature, learned, logit, relation, token, transformer  # noqa: F401  (registers the built-in losses)
from alambic.losses.registry import (
    LossSpec,
    build_loss,
    check_hyper_parameters,
    get_loss,
    get_loss_spec,
    list_losses,
    register_loss,
)

__all__ = [
    "LossSpec",
    "build_loss",
    "check_hyper_parameters",
    "get_loss",
    "get_loss_spec",
    "list_losses",
    "register_loss",
]
