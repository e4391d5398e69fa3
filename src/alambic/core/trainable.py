"""What the loop trains: the interface :func:`alambic.core.loop.fit` relies on, written down.

:class:`~alambic.core.distiller.Distiller` (a student, its connectors and learned losses),
:class:`~alambic.strategies.online.MutualDistiller` and :class:`~alambic.strategies.online.SelfDistiller`
implement it; a strategy of one's own does too.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn


class Trainable(Protocol):
    """A ``torch.nn.Module`` holding the student and everything that trains with it.

    Calling it returns the step's named, weighted losses with their sum under ``"total"``.
    """

    student: nn.Module  # what fit returns (and what is evaluated and saved)
    needs_teacher: bool  # whether a term reads the teacher's outputs
    has_token_terms: bool  # token losses: the loop normalises them over each accumulation window

    @property
    def needs_probe(self) -> bool:
        """Whether :meth:`build_modules` must see one batch before the optimizer is built."""

    def build_modules(
        self, inputs: Any, teacher: Any, num_samples: int | None = None, sample_index: Tensor | None = None
    ) -> None:
        """Create parameters sized by one probing pass (connectors, learned losses)."""

    def check(
        self, inputs: Any, labels: Tensor | None, teacher: Any, sample_index: Tensor | None = None
    ) -> None:
        """Run every term once on a real batch before step 0; raise a one-line error for what fails."""

    def __call__(
        self,
        inputs: Any,
        labels: Tensor | None,
        teacher_outputs: Any,
        epoch: float | None = None,
        sample_index: Tensor | None = None,
        token_scale: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The step's weighted losses and their ``total``."""

    # and nn.Module's parameters(), to(), train(), eval(), state_dict(), load_state_dict()
    def parameters(self) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
