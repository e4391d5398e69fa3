"""A run's artifacts rebuilt: its models from ``config.yaml`` and their weights, with the run's data.

What ``alambic export``, ``alambic compress`` and benchmarks use to get a trained model back from a run
directory (or a bare checkpoint); the formats themselves are written by :mod:`alambic.compress.export`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from alambic.compress.export import FORMATS, default_export_path, export_model
from alambic.compress.export_hf import quiet_transformers
from alambic.config import ModelConfig, load_config
from alambic.config.run import TEACHER_SAMPLES
from alambic.core.batches import example_input, real_inputs
from alambic.core.evaluate import evaluate_classifier, profile_model
from alambic.core.lock import run_lock
from alambic.data import build_datasets
from alambic.data.datasets import take_train_subset
from alambic.data.loaders import make_loader
from alambic.errors import AlambicError, ConfigError, first_line
from alambic.models.lora import merge_lora
from alambic.models.surgery import load_resized
from alambic.run.building import (
    RunData,
    build_named_model,
    build_run_datasets,
    derive_from_teacher,
    run_tokenizer,
)
from alambic.run.plan import FromConfig, saved_models
from alambic.run.planners import plan
from alambic.run.rundir import check_run_dir
from alambic.run.teacher_samples import stored_sample_datasets


@dataclass
class LoadedModel:
    """A model rebuilt for export, with the data it is checked on."""

    model: nn.Module
    info: Any  # DatasetInfo
    train_set: Any
    test_set: Any
    description: dict
    tokenizer: str | None = None  # a text run's tokenizer (folder or hub id), saved with an HF export


def student_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights of a saved model; a training checkpoint's connectors and learned losses are dropped.

    A damaged (or malicious) file is refused in one line naming it and how to train it again.
    """
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise AlambicError(
            f"cannot read {path} ({first_line(error)}): the file is damaged or not safetensors; "
            f"{retrain_hint(path)}"
        ) from None
    if any(key.startswith("student.") for key in state):  # a Distiller checkpoint: student + connectors
        state = {
            key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")
        }
    return state


def retrain_hint(path: Path) -> str:
    """How to get a damaged ``path`` back: a run's stage weights are trained again with ``--resume``."""
    run_dir = path.parent.parent
    if path.name == "model.safetensors" and (run_dir / "config.yaml").is_file():
        return (
            f"delete it and train its stage again: alambic run {run_dir / 'config.yaml'} --resume {run_dir}"
        )
    return "save or export the weights again"


def load_run_model(
    source: str | Path,
    *,
    model: str = "student",
    data_dir: str | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    kwargs: dict | None = None,
) -> LoadedModel:
    """Rebuild a saved model and its data: a run directory's ``model``, or a checkpoint with ``arch``.

    Args:
        source: A run directory written by ``alambic run``, or a ``.safetensors`` checkpoint.
        model: For a run directory: ``student`` (the distilled one), ``baseline``, ``teacher``, or any
            other model the run's plan saves (``baseline-seed1``, ``generation_1``, ``peer_1``, ...).
        data_dir: Overrides the run's ``data.data_dir`` (or the checkpoint's data folder).
        arch: For a checkpoint: zoo name or ``package.module:function``.
        dataset: For a checkpoint: the data set whose test split checks the export.
        kwargs: For a checkpoint: the model's arguments.

    Example:
        >>> loaded = load_run_model("runs/mnist-demo")
        >>> loaded.model
    """

    source = Path(source)
    if source.is_dir():
        config = load_config(check_run_dir(source) / "config.yaml")
        folder, model_config = run_model_source(config, model)
        weights = source / folder / "model.safetensors"
        if not weights.is_file():
            raise AlambicError(f"{weights} does not exist; has the run's {model} stage finished?")
        model_config = model_config.model_copy(update={"checkpoint": None})
        train_set, test_set, info = run_datasets(config, source, data_dir=data_dir)
        built = build_run_architecture(config, model, info)
        tokenizer = run_tokenizer(config)
        if config.task == "causal-lm" and (source / "tokenizer").is_dir():
            tokenizer = str(source / "tokenizer")  # the run's own (a character set is built from its text)
    elif source.is_file():
        if arch is None or dataset is None:
            raise AlambicError(
                f"{source} is a checkpoint: give --arch and --dataset (or pass a run directory)"
            )
        weights = source
        model_config = ModelConfig(arch=arch, kwargs=kwargs or {})
        train_set, test_set, info = build_datasets(dataset, data_dir=data_dir)
        built, tokenizer = build_named_model(model_config, info), None
    else:
        raise AlambicError(f"{source} does not exist; pass a run directory or a .safetensors checkpoint")
    if weights.suffix != ".safetensors":
        raise AlambicError(f"{weights}: export reads safetensors weights; convert it with alambic first")
    built = load_saved(built, weights)
    description = {"arch": model_config.arch, "kwargs": model_config.kwargs, "weights": str(weights)}
    if model_config.lora is not None:
        description["lora"] = model_config.lora.model_dump()
    return LoadedModel(built.eval(), info, train_set, test_set, description, tokenizer)


def run_datasets(config: Any, run_dir: Path, *, data_dir: str | None = None) -> tuple[Any, Any, Any]:
    """A finished run's ``(train, test, info)``, the whole training set without augmentation: a
    ``teacher-samples`` run's rows read back from ``run_dir`` without building its teacher, else built again.

    Example:
        >>> train_set, test_set, info = run_datasets(load_config("runs/x/config.yaml"), Path("runs/x"))
    """
    if config.data.dataset == TEACHER_SAMPLES:
        stored = stored_sample_datasets(run_dir, config.data.teacher_samples, seed=config.seed)
        if stored is not None:
            return stored
    return build_run_datasets(config, data_dir=data_dir, augment=False, subset=False, run_dir=run_dir)


def stored_run_data(config: Any, run_dir: Path) -> RunData | None:
    """A finished ``teacher-samples`` run's data (see :class:`~alambic.run.building.RunData`) read back
    from ``run_dir`` without building its teacher; None for other runs (their data is built as usual)."""
    if config.data.dataset != TEACHER_SAMPLES:
        return None
    stored = stored_sample_datasets(run_dir, config.data.teacher_samples, seed=config.seed)
    if stored is None:
        return None
    train_set, test_set, info = stored
    subset = train_set
    if config.data.train_subset is not None:
        subset = take_train_subset(
            train_set, config.data.train_subset, seed=config.seed, name=config.data.dataset
        )
    return RunData(subset, train_set, test_set, info)


def load_saved(model: nn.Module, weights: Path) -> nn.Module:
    """``model`` (its architecture rebuilt) with a run's saved ``weights``; a LoRA student comes back as the
    plain model its adapters merge into, which is what is exported, compressed and measured."""
    return merge_lora(load_resized(model, student_state_dict(weights)))


def run_model_source(config: Any, model: str) -> tuple[str, ModelConfig]:
    """The folder of a run's saved ``model`` and the model config its architecture is built from, as the
    run's plan has them; a one-line error naming the models it saves for another name."""
    saved = saved_models(plan(config))
    if model not in saved:
        raise ConfigError(f"--model must be one of {', '.join(saved)}, got {model!r}")
    folder, build = saved[model]
    if isinstance(build, FromConfig):
        return folder, build.model_config
    return folder, config.teacher.model if model == "teacher" else config.student.model


def build_run_architecture(config: Any, model: str, info: Any) -> nn.Module:
    """A run's saved ``model`` (``student``, ``baseline``, ``teacher``, ``peer_1``, ...: see
    :func:`run_model_source`) as an architecture, before its weights.

    A ``derive:teacher`` student is derived from the teacher's architecture (its weights are then
    replaced by the run's), so the teacher's ``hf:`` folder or hub id must still be reachable.

    Example:
        >>> student = build_run_architecture(load_config("runs/sst2/config.yaml"), "student", info)
    """

    _, model_config = run_model_source(config, model)
    with quiet_transformers():
        student = model_config.model_copy(update={"checkpoint": None})
        if student.arch == "derive:teacher":
            teacher = build_named_model(
                config.teacher.model.model_copy(update={"checkpoint": None}), info, task=config.task
            )
            return derive_from_teacher(teacher, student)
        return build_named_model(student, info, task=config.task)


def export_run(
    source: str | Path,
    out: str | Path | None = None,
    *,
    export_format: str = "onnx",
    model: str = "student",
    data_dir: str | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    kwargs: dict | None = None,
    check_samples: int = 64,
) -> dict[str, Any]:
    """Export a run's student (or a checkpoint) and check it on ``check_samples`` real test inputs.

    What ``alambic export`` calls. ``out`` defaults to ``RUN_DIR/export/MODEL.onnx`` (or ``.pt2``,
    ``.safetensors``, or the folder ``MODEL-hf/`` for a Hugging Face model's safetensors); for a
    checkpoint, next to it. A text run's model is checked on tokenized test sentences.

    Example:
        >>> export_run("runs/mnist-demo", export_format="onnx")["max_abs_diff"]
    """
    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    source = Path(source)
    # one writer per run directory: locked when the export lands in it (by default, RUN_DIR/export/)
    inside = source.is_dir() and (out is None or source.resolve() in Path(out).resolve().parents)
    with run_lock(source) if inside else contextlib.nullcontext():
        loaded = load_run_model(
            source, model=model, data_dir=data_dir, arch=arch, dataset=dataset, kwargs=kwargs
        )
        if out is None:
            folder = source / "export" if source.is_dir() else source.parent
            stem = model if source.is_dir() else source.stem
            out = default_export_path(folder, stem, export_format, loaded.model)
        inputs = real_inputs(loaded.test_set, check_samples)
        description = {**loaded.description, "input_shape": list(loaded.info.input_shape)}
        description["num_classes"] = loaded.info.num_classes
        report = export_model(
            loaded.model,
            inputs,
            out,
            export_format=export_format,
            description=description,
            tokenizer=loaded.tokenizer,
        )
    report["parameters"] = sum(parameter.numel() for parameter in loaded.model.parameters())
    report["model"] = model
    return report


def evaluate_checkpoint(
    path: str | Path, *, arch: str, dataset: str, data_dir: str | None = None, kwargs: dict | None = None
) -> dict:
    """Evaluate one checkpoint (safetensors or a torch checkpoint read weights_only) on a data set's test split."""
    _, test_set, info = build_datasets(dataset, data_dir=data_dir)
    model = build_named_model(ModelConfig(arch=arch, kwargs=kwargs or {}, checkpoint=str(path)), info)
    loader = make_loader(test_set, batch_size=256, shuffle=False)
    metrics = evaluate_classifier(model, loader, num_classes=info.num_classes)
    profile = profile_model(model, example_input(test_set), threads=1)
    return {
        "run_name": Path(path).name,
        "dataset": dataset,
        "models": {"checkpoint": {"architecture": arch, **metrics, **profile}},
    }
