"""``alambic augment`` and ``data.transfer.augment``: a transfer set of augmented sentences, from a text file
(or the run's training sentences) and the teacher's vocabulary.

The teacher gives the tokenizer and the input-embedding table whose nearest neighbours replace words
(:mod:`alambic.data.augment`); it is ``hf:FOLDER_OR_HUB_ID``, or a run directory whose trained teacher
(``teacher/model.safetensors``) and tokenizer are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from alambic.config import RunConfig
from alambic.config.augment import AugmentSettings
from alambic.config.base import hf_path
from alambic.data import TransferDataset
from alambic.data.augment import write_augmented
from alambic.data.text import TokenizedDataset, load_tokenizer, read_sentences
from alambic.data.transfer_files import build_transfer_rows
from alambic.errors import ConfigError
from alambic.models.hf import load_hf_model
from alambic.run.artifacts import load_run_model
from alambic.run.building import run_tokenizer


def teacher_vocabulary(teacher: str) -> tuple[Any, np.ndarray]:
    """The teacher's tokenizer and its input-embedding table ``[V, D]`` (float32)."""
    name = hf_path(teacher)
    if name is not None:
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
    return load_tokenizer(tokenizer_name), embedding_table(model, repr(teacher))


def embedding_table(model: nn.Module, name: str) -> np.ndarray:
    """The teacher's input-embedding table ``[V, D]`` (float32), or a one-line error naming it."""
    return input_embeddings(model, name).weight.detach().float().cpu().numpy()


def input_embeddings(model: nn.Module, name: str) -> nn.Module:
    """The teacher's input-embedding layer, or a one-line error: the pre-flight calls it before the teacher
    stage, so a teacher without one fails before it is trained, not after."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise ConfigError(
            f"the teacher {name} ({type(model).__name__}) has no input-embedding table to find neighbours in; "
            "data.transfer.augment needs a teacher with one (a Hugging Face model, hf:...), or give the "
            "augmented sentences as data.transfer.path"
        )
    return embeddings


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


def training_sentences(train_set: TokenizedDataset, tokenizer: Any) -> list[str]:
    """The training rows as the model sees them, decoded from their token ids (special and padding tokens
    dropped; cut to ``data.max_length``; lower-cased by an uncased tokenizer)."""
    return tokenizer.batch_decode(train_set.columns["input_ids"].tolist(), skip_special_tokens=True)


def augment_probe_set(config: RunConfig, train_set: Any) -> TransferDataset:
    """What stands for ``data.transfer.augment``'s rows in the pre-flight, before the teacher exists: the
    training rows without their labels (same tokenizer and width). A one-line error for a non-text set."""
    if not isinstance(train_set, TokenizedDataset):
        raise ConfigError(
            f"data.transfer.augment augments sentences, and data set {config.data.dataset!r} holds none; "
            "use a text data set (sst2) or give data.transfer.path"
        )
    return TransferDataset(train_set, train_set, ratio=config.data.transfer.ratio)


def augmented_transfer(
    config: RunConfig, run_dir: Path, train_set: Any, teacher: nn.Module, accelerator: Accelerator
) -> TransferDataset:
    """``data.transfer.augment``'s transfer set: the training sentences augmented with the teacher's tokenizer
    and embedding table, written once to ``RUN_DIR/transfer/augmented.txt`` (with its sidecar; reused while
    the settings, sentences and teacher are the same), then read as ``data.transfer.path`` would be."""
    transfer = config.data.transfer
    augment_probe_set(config, train_set)
    tokenizer_name = run_tokenizer(config)
    tokenizer = load_tokenizer(tokenizer_name)
    path = Path(run_dir) / "transfer" / "augmented.txt"
    if accelerator.is_main_process:
        write_augmented(
            training_sentences(train_set, tokenizer),
            path,
            tokenizer,
            embedding_table(teacher, "of the run"),
            describe={"source": "the run's training sentences", "teacher": config.teacher.model.arch},
            **transfer.augment.model_dump(),
        )
    accelerator.wait_for_everyone()
    rows = build_transfer_rows(train_set, path, max_rows=transfer.max_rows, tokenizer=tokenizer_name)
    return TransferDataset(train_set, rows, ratio=transfer.ratio)
