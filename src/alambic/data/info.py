"""What a data set tells the models and reports built on it (kept apart so every data module can use it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DatasetInfo:
    """What a model and a report need to know about a dataset.

    Attributes:
        name: The dataset name given to :func:`build_datasets`.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: Shape of one input, e.g. ``(1, 28, 28)`` or ``(64,)``.
        class_names: Human-readable class names, ``num_classes`` of them.
        mean: Per-channel mean subtracted from inputs in [0, 1], or None when not normalised.
        std: Per-channel std the inputs are divided by, or None when not normalised.
        vocab_size: For tokenized text sets: the tokenizer's vocabulary size (``len(tokenizer)``), the
            default ``vocab_size`` of the zoo's text models; None otherwise.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    vocab_size: int | None = None


@dataclass
class LMDatasetInfo(DatasetInfo):
    """A language-model data set's :class:`DatasetInfo`: ``num_classes`` is the vocabulary size,
    ``class_names`` is empty, and ``unit`` (``"byte"`` or ``"char"``; ``"token"`` for token ids without a
    tokenizer, such as teacher samples) is what bits-per-unit metrics divide by.
    """

    unit: str = "byte"
    tokenizer: Any = None  # the data's tokenizer (alambic.data.tokenizers), saved with a run and its exports
    generated: Any = None  # data made in the run (teacher samples): what the run directory keeps of it
