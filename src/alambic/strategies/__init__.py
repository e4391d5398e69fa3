"""Strategies beyond one frozen teacher, composed from the loop, the distiller and the loss registry.

- :class:`EnsembleModel` / :func:`average_weights`: several teachers as one (outputs or weights).
- :class:`MutualDistiller` / :func:`mutual_learning`: peers that teach each other (DML, online KD).
- :class:`SelfDistiller`: shallow exits distilled from the deepest (Be Your Own Teacher).
- :func:`train_teacher_free`: trains such a module (it brings its own targets) with the one loop.
- :class:`MixedDataset`: mixup / CutMix views, seen alike by teacher and student.
- Born-again generations and teacher-assistant chains are run configs (``strategy:``; see docs/strategies.md).
"""

from alambic.data.mixing import MixedDataset
from alambic.strategies.ensemble import EnsembleModel, average_weights
from alambic.strategies.online import MutualDistiller, SelfDistiller, mutual_learning, train_teacher_free

__all__ = [
    "EnsembleModel",
    "MixedDataset",
    "MutualDistiller",
    "SelfDistiller",
    "average_weights",
    "mutual_learning",
    "train_teacher_free",
]
