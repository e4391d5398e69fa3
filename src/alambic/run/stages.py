"""The stages of a run executed: each one's data, loop, checkpoints, saved weights and timing.

:func:`run_plan` walks a run's plan (:mod:`alambic.run.plan`): each stage is loaded when finished, trained
when it runs, or used as built; :func:`train_stage` is how every stage trains (the plain pipeline's
teacher, baseline and distilled student, and every strategy's members and links).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from alambic.config import RunConfig, TrainConfig
from alambic.core.api import train_module
from alambic.core.batches import example_input
from alambic.core.cache import CachedTeacher
from alambic.core.callbacks import callbacks_report, config_callbacks
from alambic.core.checkpoint import atomic_write_text, load_weights_file, save_weights
from alambic.core.distiller import Distiller, Teacher
from alambic.core.monitor import MetricsLog
from alambic.data import IndexedDataset, find_transfer
from alambic.data.loaders import make_loader
from alambic.data.mixing import MixedDataset
from alambic.errors import ConfigError
from alambic.files import dumps_json
from alambic.run.augment import augmented_transfer
from alambic.run.evaluation import evaluation_progress, stage_evaluator
from alambic.run.lm_distill import on_policy_data, on_policy_loader, sequence_kd_set
from alambic.run.plan import Builder, Stage
from alambic.run.rundir import write_status


@dataclass
class RunContext:
    """What every stage of one run shares."""

    config: RunConfig
    run_dir: Path
    accelerator: Accelerator
    train_set: Any
    test_set: Any
    info: Any
    log: MetricsLog
    progress: Any
    architectures: dict[str, str] = field(default_factory=dict)  # each model's, by its summary name
    transfer: Any = (
        None  # data.transfer: the training set followed by its transfer rows (distill stages only)
    )

    @property
    def distill_set(self) -> Any:
        """What the stages that learn from a teacher train on: the training set, with its transfer rows."""
        return self.train_set if self.transfer is None else self.transfer


def train_stage(
    context: RunContext,
    stage: str,
    model: nn.Module,
    terms,
    train: TrainConfig,
    teacher: Teacher | None,
    module: nn.Module | None = None,
    train_set: Any = None,
    wrap_loader: Callable[[Any, nn.Module], Any] | None = None,
    folder: str | None = None,
) -> nn.Module:
    """Train ``model`` with ``terms`` (resuming from its checkpoints) and save it as ``model.safetensors``.

    ``module``: a trainable module of its own (a strategy's, with the Distiller interface) instead of
    ``Distiller(model, terms)``. ``train_set``: data of its own instead of the run's training set (the
    teacher's generations); ``wrap_loader(prepared_loader, model)``: the loader as the stage wants it
    (on-policy batches). ``folder``: the run-directory folder it saves in (default: the stage's name)."""
    accelerator = context.accelerator
    folder = context.run_dir / (folder or stage)
    accelerator.gradient_accumulation_steps = train.grad_accum
    stage_set = stage_train_set(
        context.train_set if train_set is None else train_set, train.augment, train.mix, train.mix_alpha
    )
    loader = make_loader(
        stage_set,
        batch_size=train.batch_size,
        shuffle=True,
        seed=context.config.seed,
        num_workers=context.config.data.num_workers,
        dynamic_padding=context.config.data.dynamic_padding,
        group_by_length=context.config.data.group_by_length,
    )
    if wrap_loader is not None:  # around the prepared loader, so that each process keeps its shard
        loader = wrap_loader(accelerator.prepare(loader), model)
    callbacks = config_callbacks(train)  # train.early_stopping, train.keep_best
    student = train_module(
        module
        if module is not None
        else Distiller(
            model,
            terms,
            unlabelled_rows=find_transfer(stage_set) is not None,
            fused_output=teacher is not None and context.config.distill.fused_output,
        ),
        loader,
        train.loop(),
        accelerator=accelerator,
        teacher=teacher,
        evaluate=stage_evaluator(
            context.config,
            context.test_set,
            context.info,
            accelerator,
            stage=stage,
            progress=context.progress,
        ),
        log=context.log,
        checkpoint_dir=folder / "checkpoints",
        stage=stage,
        progress=context.progress,
        callbacks=callbacks,
    )
    if report := callbacks_report(callbacks):
        add_record(context, "stopping.json", stage, report)  # summary.json's stages_stopping
    if accelerator.is_main_process:
        save_weights(student, folder / "model.safetensors", metadata={"stage": stage})
    accelerator.wait_for_everyone()
    return student


def stage_train_set(train_set: Any, augment: bool | None, mix: str = "none", mix_alpha: float = 1.0) -> Any:
    """The training set as this stage wants it, yielding sample indices (CRD's memory bank reads them).

    ``augment: false`` gives a view without augmentation; ``mix`` mixes each sample with a partner.
    """
    if not (augment is None or augment or getattr(train_set, "augmentation", None) is None):
        train_set = copy.copy(train_set)  # shares the tensors
        train_set.augmentation = None
    if mix != "none":
        train_set = MixedDataset(train_set, mix, mix_alpha)
    return IndexedDataset(train_set)


def run_plan(context: RunContext, stages: list[Stage]) -> dict[str, nn.Module]:
    """Execute a run's plan: each stage loaded (finished), trained, or used as built; returns every model
    by its summary name (and records each one's architecture in ``context.architectures``)."""
    builder = Builder(context.config, context.info, example_input(context.test_set), context.train_set)
    models: dict[str, nn.Module] = {}
    for stage in stages:
        models.update(run_stage(context, stage, builder, models))
    return models


def stage_finished(run_dir: Path, stage: Stage) -> bool:
    """Whether every model of ``stage`` is saved in ``run_dir`` (a stage that saves none never is)."""
    folders = stage.folders
    return bool(folders) and all((run_dir / folder / "model.safetensors").is_file() for folder in folders)


def run_stage(context: RunContext, stage: Stage, builder: Builder, models: dict) -> dict[str, nn.Module]:
    """One stage: its models built (``stage.seed``), then loaded when finished, else trained when it runs;
    a stage that neither ran nor finished gives nothing, or a one-line error when a later stage needs it."""
    finished = stage_finished(context.run_dir, stage)
    trains = stage.train is not None and not finished
    if trains and not stage.runs:
        if stage.required:
            raise ConfigError(stage.missing)
        return {}
    if stage.folder is not None:
        write_status(context.run_dir, context.accelerator, state="running", stage=stage.name)
    set_seed(stage.seed)
    model = stage.build(builder, models)
    # derive:teacher: the teacher layers it kept (and their Block Influence when kept by importance)
    derived = getattr(model, "derive_report", None)
    if derived is not None and stage.folder is not None and context.accelerator.is_main_process:
        (context.run_dir / stage.folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(context.run_dir / stage.folder / "derive.json", dumps_json(derived, indent=2))
    companions = []
    for companion in stage.companions:
        set_seed(companion.seed)
        companions.append(companion.build(builder, models))
    names = [stage.model, *(companion.model for companion in stage.companions)]
    if finished:
        for built, folder, name in zip([model, *companions], stage.folders, names):
            load_finished_stage(built, context.run_dir / folder / "model.safetensors", name)
    elif trains:
        model = _train_planned(context, stage, model, companions, builder, models)
    context.architectures[stage.model] = stage.architecture
    for companion in stage.companions:
        context.architectures[companion.model] = companion.architecture
    return dict(zip(names, [model, *companions]))


def _train_planned(
    context: RunContext, stage: Stage, model: nn.Module, companions: list, builder: Builder, models: dict
) -> nn.Module:
    """Train a planned stage (and its companions), save its models, record its time and peak memory."""
    seed = stage.seed if stage.train_seed is None else stage.train_seed
    if stage.train_seed is not None:
        set_seed(seed)  # an ensemble member: the shared initialisation, its own data order
    if seed != context.config.seed:  # the loader's order and the stage's sampling follow the stage's seed
        context = dataclasses.replace(context, config=context.config.model_copy(update={"seed": seed}))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    data = _stage_data(context, stage, models)
    train_set = data["make_train_set"]() if "make_train_set" in data else None  # before the teacher is cast
    teacher = None
    if stage.teacher is not None:
        teacher = distill_teacher(
            context.config, models[stage.teacher], context.distill_set, terms=stage.terms
        )
    module = stage.trainable(model, companions, builder.example) if stage.trainable is not None else None
    model = train_stage(
        context,
        stage.name,
        model,
        stage.terms,
        stage.train,
        teacher,
        module,
        train_set=train_set,
        wrap_loader=data.get("wrap_loader"),
        folder=stage.folder,
    )
    if context.accelerator.is_main_process:
        for companion, built in zip(stage.companions, companions):
            path = context.run_dir / companion.model / "model.safetensors"
            save_weights(built, path, metadata={"stage": companion.model})
    context.accelerator.wait_for_everyone()
    add_timing(context, stage.name, time.perf_counter() - started)
    add_record(context, "peak_memory.json", stage.name, peak_memory())
    return model


def _stage_data(context: RunContext, stage: Stage, models: dict) -> dict[str, Any]:
    """``make_train_set`` / ``wrap_loader`` of a stage: the transfer set or the language-model recipe's data
    for a stage that learns from a teacher (``data: distill``), else nothing (the training set)."""
    if stage.data != "distill":
        return {}
    if augments(context.config) and context.transfer is None:  # written once, with the teacher's vocabulary
        context.transfer = augmented_transfer(
            context.config, context.run_dir, context.train_set, models["teacher"], context.accelerator
        )
    if context.transfer is not None:
        return {"make_train_set": lambda: context.transfer}
    return language_model_distill_data(context, lambda: models["teacher"])


def augments(config: RunConfig) -> bool:
    """Whether the distill stage trains on ``data.transfer.augment``'s sentences."""
    transfer = config.data.transfer
    return transfer is not None and transfer.augment is not None and "distill" in config.stages


def load_finished_stage(model: nn.Module, weights: Path, stage: str) -> None:
    """Load a finished stage's ``model.safetensors``; a damaged file is one line saying how to retrain it."""
    load_weights_file(model, weights, fix=f"delete {weights} to train the {stage} stage again with --resume")


def peak_memory() -> dict[str, Any]:
    """Peak memory: the GPU's allocated bytes since the last reset, else the process's peak resident set."""
    if torch.cuda.is_available():
        return {"device": "cuda", "peak_bytes": torch.cuda.max_memory_allocated()}
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    # the CPU figure is the process's peak so far (it cannot be reset per stage)
    return {"device": "cpu", "peak_bytes": peak if sys.platform == "darwin" else peak * 1024}


def add_timing(context: RunContext, stage: str, seconds: float) -> None:
    add_record(context, "timings.json", stage, round(seconds, 3))


def add_record(context: RunContext, file: str, stage: str, value: Any) -> None:
    if context.accelerator.is_main_process:
        path = context.run_dir / file
        records = json.loads(path.read_text()) if path.is_file() else {}
        records[stage] = value
        atomic_write_text(path, dumps_json(records, indent=2))


def distill_teacher(
    config: RunConfig,
    model: nn.Module,
    train_set: Any,
    *,
    check_weights: bool = True,
    preload: bool | None = None,
    terms: list | None = None,
) -> Any:
    """The distill stage's teacher: live (in ``teacher_dtype``), or replayed from ``teacher_cache``, which is
    checked against the stage's training data and (``check_weights``) against ``model``'s weights.

    ``terms``: those it serves (default: ``distill.terms``)."""
    distill = config.distill
    terms = distill.terms if terms is None else terms
    if distill.teacher_cache:
        return CachedTeacher(
            distill.teacher_cache,
            teacher=model if check_weights else None,
            dataset=stage_train_set(train_set, distill.train.augment),
            terms=terms,
            preload=preload,
        )
    dtype = None if distill.teacher_dtype == "float32" else getattr(torch, distill.teacher_dtype)
    return Teacher(model, terms, dtype=dtype, fused_output=distill.fused_output)


def language_model_distill_data(context: RunContext, teacher: Callable[[], nn.Module]) -> dict[str, Any]:
    """``make_train_set`` and ``wrap_loader`` of the distill stage for ``distill.sequence_kd`` (the
    teacher's generations) or ``distill.on_policy`` (the student's samples); empty for plain KD."""
    config = context.config
    sequence_kd, on_policy = config.distill.sequence_kd, config.distill.on_policy
    if sequence_kd is not None:
        return {
            "make_train_set": lambda: sequence_kd_set(
                context.run_dir,
                sequence_kd,
                teacher(),
                context.train_set,
                seed=config.seed,
                accelerator=context.accelerator,
                tokenizer=getattr(context.info, "tokenizer", None),  # prompts_file: read as text
                progress=evaluation_progress(context.progress, "teacher answers", "prompts"),
            )
        }
    if on_policy is not None:
        return {
            "make_train_set": lambda: on_policy_data(context.train_set, on_policy),
            "wrap_loader": lambda loader, student: on_policy_loader(loader, student, on_policy, config.seed),
        }
    return {}
