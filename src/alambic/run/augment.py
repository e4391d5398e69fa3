"""``alambic augment``: a transfer set of augmented sentences, from a text file and the teacher's vocabulary.

The teacher gives the tokenizer and the input-embedding table whose nearest neighbours replace words
(:mod:`alambic.data.augment`); it is ``hf:FOLDER_OR_HUB_ID``, or a run directory whose trained teacher
(``teacher/model.safetensors``) and tokenizer are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from alambic.config.augment import AugmentSettings
from alambic.data.augment import write_augmented
from alambic.data.text import load_tokenizer, read_sentences
from alambic.errors import ConfigError
from alambic.models.hf import load_hf_model
from alambic.run.artifacts import load_run_model


def teacher_vocabulary(teacher: str) -> tuple[Any, np.ndarray]:
    """The teacher's tokenizer and its input-embedding table ``[V, D]`` (float32)."""
    if teacher.startswith("hf:"):
        name = teacher.removeprefix("hf:")
        model, tokenizer_name = load_hf_model(name, task="embedding"), name
    elif Path(teacher).is_dir():
        loaded = load_run_model(teacher, model="teacher")
        model, tokenizer_name = loaded.model, loaded.tokenizer
        if tokenizer_name is None:
            raise ConfigError(f"the teacher of the run {teacher} has no tokenizer; is it a text run?")
    else:
        raise ConfigError(
            f"--teacher takes hf:FOLDER_OR_HUB_ID or a run directory, got {teacher!r} (not a folder)"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ConfigError(f"the teacher {teacher!r} has no input-embedding table to find neighbours in")
    return load_tokenizer(tokenizer_name), embeddings.weight.detach().float().numpy()


def augment_file(source: str | Path, out: str | Path, *, teacher: str, settings: AugmentSettings) -> dict:
    """Augment the sentences of ``source`` (``.txt`` or SST-2 ``.tsv``) into ``out`` with its sidecar JSON.

    Returns the sidecar's record (counts, settings, ``reused`` when an identical earlier file was kept).

    Example:
        >>> record = augment_file("train.tsv", "transfer.txt", teacher="hf:all-MiniLM-L6-v2",
        ...                       settings=AugmentSettings(copies=20))
    """
    sentences = read_sentences(source)
    tokenizer, embeddings = teacher_vocabulary(teacher)
    describe = {"source": str(source), "teacher": teacher}
    return write_augmented(sentences, out, tokenizer, embeddings, describe=describe, **settings.model_dump())
