"""Build a run's models from their configs: zoo names, user factories, ``hf:`` models, derived students.

Shared by the pipeline's stages, the pre-flight checks that run before a run directory exists, the
strategies, tuning, export and compression.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alambic.config import RunConfig
from alambic.config.base import HF_CONFIG, LLAMA2C_PREFIX, hf_path
from alambic.config.run import TEACHER_SAMPLES
from alambic.core.batches import call_model, logits_of
from alambic.data import LMDatasetInfo, TransferDataset, build_datasets
from alambic.data.datasets import take_train_subset
from alambic.data.transfer_files import build_transfer_rows
from alambic.errors import AlambicError, ConfigError, first_line
from alambic.models import (
    build_factory_model,
    build_model,
    init_from_teacher_embeddings,
    load_weights,
    model_options,
    teacher_embedding_table,
)
from alambic.models.hf import build_hf_model, derive_student, load_hf_model
from alambic.models.importance import CALIBRATION_WINDOWS, text_windows
from alambic.models.llama2c import load_llama2c
from alambic.models.lora import with_lora
from alambic.run.teacher_samples import teacher_sample_datasets


def build_named_model(
    model_config, info, side: str = "model", task: str = "classification", teacher: nn.Module | None = None
) -> nn.Module:
    """Build a model from its config and load its checkpoint when one is given.

    ``task`` (the run's) picks a Hugging Face model's head: a classifier of ``info.num_classes`` labels,
    or a causal language model over a vocabulary of ``info.num_classes`` tokens. A constructor that rejects its kwargs (``dropout: 2``, a wrong type) becomes a one-line
    :class:`ConfigError` naming ``side`` (``teacher``, ``student``, ...), the architecture and the kwargs.

    ``kwargs.init_embeddings: teacher`` fills the model's embedding table from ``teacher``'s, projected by
    PCA (:func:`alambic.models.init_from_teacher_embeddings`); without a ``teacher`` (a trained model's
    architecture rebuilt, whose weights then replace it) it is skipped.
    """
    init_embeddings = wants_teacher_embeddings(model_config, side)
    if init_embeddings:
        kwargs = {key: value for key, value in model_config.kwargs.items() if key != "init_embeddings"}
        model_config = model_config.model_copy(update={"kwargs": kwargs})
    try:
        model = _construct(model_config, info, task)
    except AlambicError:
        raise
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        message = first_line(error)
        raise ConfigError(
            f"{side}.model: {model_config.arch} cannot be built with kwargs {dict(model_config.kwargs)}: "
            f"{message}; fix {side}.model.kwargs"
        ) from error
    if init_embeddings and teacher is not None:
        init_from_teacher_embeddings(model, teacher_embedding_table(teacher))
    if model_config.checkpoint:
        load_weights(model, model_config.checkpoint)
    return adapt(model, model_config)


def adapt(model: nn.Module, model_config) -> nn.Module:
    """``model`` with the LoRA adapters its config asks for (``model.lora``), else ``model`` itself."""
    if model_config.lora is None:
        return model
    return with_lora(model, **model_config.lora.model_dump())


def wants_teacher_embeddings(model_config, side: str = "student") -> bool:
    """Whether a model config asks for the teacher's embeddings (``kwargs.init_embeddings: teacher``)."""
    value = model_config.kwargs.get("init_embeddings")
    if value is None:
        return False
    if value != "teacher":
        raise ConfigError(
            f"{side}.model.kwargs.init_embeddings must be 'teacher', got {value!r}; fix or remove it"
        )
    return True


def _construct(model_config, info, task: str) -> nn.Module:
    kwargs = dict(model_config.kwargs)
    path = hf_path(model_config.arch)
    if path is not None or model_config.arch == HF_CONFIG:
        kwargs.setdefault("task", "causal-lm" if task == "causal-lm" else "sequence-classification")
    if path is not None:  # a Hugging Face model: folder or hub id, kwargs to load_hf_model
        if kwargs["task"] == "sequence-classification":
            kwargs.setdefault("num_labels", info.num_classes)
        return load_hf_model(path, **kwargs)
    if model_config.arch == HF_CONFIG:  # built from scratch from a Hugging Face config written out
        if "model_type" not in kwargs:
            raise ConfigError(
                "arch hf-config needs kwargs.model_type (gpt2, llama, bert, ...) and the config's fields"
            )
        if kwargs["task"] == "causal-lm":
            kwargs.setdefault("vocab_size", info.num_classes)
        elif kwargs["task"] == "sequence-classification":
            kwargs.setdefault("num_labels", info.num_classes)
        return build_hf_model(kwargs.pop("model_type"), **kwargs)
    if model_config.arch.startswith(LLAMA2C_PREFIX):  # a llama2.c checkpoint, as a Hugging Face Llama
        if model_config.kwargs:
            raise ConfigError(
                f"llama2c: takes no kwargs, got {dict(model_config.kwargs)}; remove model.kwargs"
            )
        return load_llama2c(model_config.arch.removeprefix(LLAMA2C_PREFIX))
    if ":" in model_config.arch:  # a user's factory is called with exactly its kwargs
        return build_factory_model(model_config.arch, dict(model_config.kwargs))
    kwargs = {"num_classes": info.num_classes, **model_config.kwargs}  # kwargs may override the class count
    if getattr(info, "vocab_size", None) and "vocab_size" in model_options(model_config.arch):
        kwargs.setdefault("vocab_size", info.vocab_size)  # a text model over the data's tokenizer ids
    return build_model(model_config.arch, input_shape=tuple(info.input_shape), **kwargs)


def derive_from_teacher(
    teacher: nn.Module, model_config, config: RunConfig | None = None, *, train_set: Any = None
) -> nn.Module:
    """``arch: derive:teacher``: a student with fewer of the (trained) teacher's layers, initialised from them.

    ``kwargs.by: importance`` keeps the ``layers`` of highest Block Influence on calibration text: the first
    ``calibration_windows`` (32) training windows of the run ``config``, or those of ``calibration_file``
    (tokenized like the run's data, in windows of ``data.block_size``). Without ``config`` (a run's
    architecture rebuilt, whose saved weights then replace the derived ones) the same number of layers is
    kept by position. The derive report (kept layers, each layer's Block Influence) is the student's
    ``derive_report`` attribute. ``train_set``: the run's training set when the caller has it (else it is
    read again for the calibration windows).
    """
    kwargs = dict(model_config.kwargs)
    calibration_file = kwargs.pop("calibration_file", None)
    windows = kwargs.pop("calibration_windows", CALIBRATION_WINDOWS)
    if kwargs.get("by") == "importance":
        if config is None:
            kwargs["by"] = "position"  # the architecture alone: any `layers` layers give the same shapes
        else:
            kwargs["calibration"] = run_calibration(config, windows, calibration_file, train_set=train_set)
    student, report = derive_student(teacher, **kwargs)
    student.derive_report = report
    if model_config.checkpoint:
        load_weights(student, model_config.checkpoint)
    return adapt(student, model_config)


def run_calibration(
    config: RunConfig, windows: int, calibration_file: str | None = None, *, train_set: Any = None
) -> Any:
    """Calibration text for ``derive:teacher`` by importance: the run's first ``windows`` training windows
    (``{"input_ids": [W, T], ...}``), or the first ``windows`` windows of ``data.block_size`` tokens of
    ``calibration_file`` tokenized by the run's tokenizer (``[W, T]``)."""
    if train_set is None or calibration_file is not None:
        train_set, _, info = build_run_datasets(config, augment=False, subset=False)
    if calibration_file is not None:
        tokenizer = getattr(info, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                "student.model.kwargs.calibration_file needs the run's tokenizer (a text data set)"
            )
        try:
            text = Path(calibration_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"student.model.kwargs.calibration_file: cannot read {calibration_file}: {error}"
            ) from None
        block_size = config.data.block_size
        ids = tokenizer.encode(text[: windows * block_size * 16])  # enough characters for the windows
        return text_windows(ids, block_size=block_size, windows=windows)
    count = min(windows, len(train_set))
    if hasattr(train_set, "get_batch"):
        return train_set.get_batch(list(range(count)))
    return [train_set[index] for index in range(count)]


@torch.no_grad()
def check_num_classes(model: nn.Module, example: torch.Tensor, num_classes: int, side: str) -> None:
    """Fail before training when a model's output size is not the data set's number of classes."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embeddings, "num_embeddings", None)
    if (
        isinstance(example, dict)
        and "input_ids" in example
        and vocabulary is not None
        and vocabulary < num_classes
    ):
        _vocabulary_mismatch(side, vocabulary, num_classes)  # token ids past its embedding table
    was_training = model.training
    model.eval()
    try:
        logits = logits_of(call_model(model, example))
    except (ValueError, RuntimeError, TypeError, IndexError) as error:
        message = first_line(error)
        raise ConfigError(
            f"the {side} cannot run on the data set's inputs (shape {tuple(getattr(example, 'shape', ()))}): "
            f"{message}; check {side}.model against data.dataset"
        ) from error
    finally:
        model.train(was_training)
    predicted = logits.shape[-1]
    if predicted != num_classes and logits.dim() == 3:  # [B, T, V]: a language model over the tokenizer's ids
        _vocabulary_mismatch(side, predicted, num_classes)
    if predicted != num_classes:
        raise ConfigError(
            f"the {side} predicts {predicted} classes but the data set has {num_classes}; "
            f"set {side}.model.kwargs.num_classes={num_classes} or remove the override"
        )


def _vocabulary_mismatch(side: str, vocabulary: int, tokens: int) -> None:
    raise ConfigError(
        f"the {side} has a vocabulary of {vocabulary} tokens but the tokenizer has {tokens}: teacher, "
        f"student and data must share one tokenizer (data.tokenizer); build the model with vocab_size {tokens} "
        "or use the model's own tokenizer"
    )


def build_run_datasets(
    config: RunConfig,
    *,
    data_dir: str | None = None,
    augment: bool | None = None,
    subset: bool = True,
    run_dir: Path | None = None,
) -> tuple[Any, Any, Any]:
    """The train and test sets of a run config, and their info.

    ``data_dir`` overrides ``data.data_dir``; ``augment`` overrides ``data.augment``; ``subset=False``
    ignores ``data.train_subset`` (the whole training set, e.g. for calibration). ``run_dir``: where
    ``data.dataset: teacher-samples`` reads the samples a run generated (else they are generated).
    """
    data = config.data
    if data.dataset == TEACHER_SAMPLES:
        return teacher_sample_datasets(
            sampling_teacher(config), data.teacher_samples, seed=config.seed, run_dir=run_dir
        )
    return build_datasets(
        data.dataset,
        data_dir=data_dir or data.data_dir,
        factory=data.factory,
        factory_kwargs=data.factory_kwargs,
        augment=data.augment if augment is None else augment,
        train_subset=data.train_subset if subset else None,
        test_fraction=data.test_fraction,
        seed=config.seed,
        tokenizer=run_tokenizer(config),
        max_length=data.max_length,
        train_file=data.train_file,
        valid_file=data.valid_file,
        valid_fraction=data.valid_fraction,
        block_size=data.block_size,
        stride=data.stride,
        packing=data.packing,
    )


def sampling_teacher(config: RunConfig) -> nn.Module:
    """The pretrained teacher that generates ``data.dataset: teacher-samples`` (its vocabulary is the data's:
    an ``hf-config`` teacher with a checkpoint gives it as ``kwargs.vocab_size``)."""
    vocabulary = config.teacher.model.kwargs.get("vocab_size", 0)
    info = LMDatasetInfo(TEACHER_SAMPLES, vocabulary, (1,), [], None, None)
    return build_named_model(config.teacher.model, info, "teacher", config.task)


def build_run_transfer(config: RunConfig, train_set: Any) -> TransferDataset | None:
    """The distill stage's training set with ``data.transfer``'s rows after the training set's; None without one.

    Read (and tokenized) once per run; every problem with the file is a one-line :class:`ConfigError`.
    None for ``data.transfer.augment`` too: :func:`alambic.run.augment.augmented_transfer` builds it after
    the teacher stage.
    """
    transfer = config.data.transfer
    if transfer is None or transfer.augment is not None:  # augment: built once the teacher exists
        return None
    rows = build_transfer_rows(
        train_set,
        transfer.path,
        field=transfer.field,
        key=transfer.key,
        max_rows=transfer.max_rows,
        tokenizer=run_tokenizer(config),
    )
    return TransferDataset(train_set, rows, ratio=transfer.ratio)


def run_tokenizer(config: RunConfig) -> str | None:
    """The tokenizer of a run's text data: ``data.tokenizer``, else the ``hf:`` teacher's own."""
    if config.data.tokenizer:
        return config.data.tokenizer
    return hf_path(config.teacher.model.arch) if config.teacher else None


@dataclass
class RunData:
    """A run's data built once: the training set as configured (subset, augmentation), the whole training
    set without augmentation (calibration, caches), the test set and the info."""

    train_set: Any
    plain_train_set: Any
    test_set: Any
    info: Any

    @property
    def datasets(self) -> tuple[Any, Any, Any]:
        """``(train, test, info)``, as :func:`build_run_datasets` returns them."""
        return self.train_set, self.test_set, self.info


def build_run_data(config: RunConfig, *, data_dir: str | None = None) -> RunData:
    """Read a run's data once and derive every view of it (see :class:`RunData`)."""
    full, test_set, info = build_run_datasets(config, data_dir=data_dir, subset=False)
    plain = full
    if getattr(full, "augmentation", None) is not None:
        plain = copy.copy(full)  # shares the tensors
        plain.augmentation = None
    train = full
    if config.data.train_subset is not None:
        train = take_train_subset(
            full,
            config.data.train_subset,
            seed=config.seed,
            name=config.data.dataset,
            factory=config.data.factory,
        )
    return RunData(train, plain, test_set, info)
