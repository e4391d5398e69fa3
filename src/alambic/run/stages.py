"""One training stage of a run: its data, its loop, its checkpoints and saved weights, its timing.

:func:`train_stage` is how every stage trains (the plain pipeline's teacher, baseline and distilled
student, and every strategy's members and links); :func:`load_or_train` loads a finished stage instead.
"""

from __future__ import annotations

import copy
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
from alambic.core.cache import CachedTeacher
from alambic.core.callbacks import callbacks_report, config_callbacks
from alambic.core.checkpoint import atomic_write_text, load_weights_file, save_weights
from alambic.core.distiller import Distiller, Teacher
from alambic.core.monitor import MetricsLog
from alambic.data import IndexedDataset, find_transfer
from alambic.data.loaders import make_loader
from alambic.data.mixing import MixedDataset
from alambic.files import dumps_json
from alambic.run.evaluation import stage_evaluator
from alambic.run.lm_distill import on_policy_data, on_policy_loader, sequence_kd_set

MODEL_DIRS = {"teacher": "teacher", "baseline": "baseline", "distill": "student"}  # stage -> folder


def stage_folder(stage: str) -> str:
    """The run-directory folder of ``stage``: ``student`` for ``distill``, ``student-seed1`` for
    ``distill-seed1`` (one more seed, see :mod:`alambic.run.seeds`), the stage's name otherwise."""
    base, separator, seed = stage.partition("-seed")
    return MODEL_DIRS.get(base, base) + separator + seed


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
    architectures: dict[str, str] = field(default_factory=dict)  # summary names beyond the three (strategies)
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
) -> nn.Module:
    """Train ``model`` with ``terms`` (resuming from its checkpoints) and save it as ``model.safetensors``.

    ``module``: a trainable module of its own (a strategy's, with the Distiller interface) instead of
    ``Distiller(model, terms)``. ``train_set``: data of its own instead of the run's training set (the
    teacher's generations); ``wrap_loader(prepared_loader, model)``: the loader as the stage wants it
    (on-policy batches)."""
    accelerator = context.accelerator
    folder = context.run_dir / stage_folder(stage)
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
    test_loader = make_loader(
        context.test_set,
        batch_size=context.config.data.eval_batch_size,
        shuffle=False,
        dynamic_padding=context.config.data.dynamic_padding,
    )
    callbacks = config_callbacks(train)  # train.early_stopping, train.keep_best
    student = train_module(
        module
        if module is not None
        else Distiller(model, terms, unlabelled_rows=find_transfer(stage_set) is not None),
        loader,
        train.loop(),
        accelerator=accelerator,
        teacher=teacher,
        evaluate=stage_evaluator(
            context.config, accelerator.prepare(test_loader), context.test_set, context.info, accelerator
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


def load_or_train(
    context: RunContext,
    stage: str,
    build,
    terms,
    train: TrainConfig,
    teacher=None,
    make_teacher=None,
    make_train_set=None,
    wrap_loader=None,
) -> nn.Module:
    """A finished stage's weights are loaded (this is how --resume skips it); otherwise the stage trains.

    ``make_teacher()`` builds the teacher only when the stage trains (a finished run re-evaluated
    without its teacher cache folder still works); so does ``make_train_set()`` (the teacher's
    generations). ``wrap_loader``: see :func:`train_stage`.
    """
    set_seed(context.config.seed)
    model = build()
    weights = context.run_dir / stage_folder(stage) / "model.safetensors"
    if weights.is_file():
        load_finished_stage(model, weights, stage)
        return model
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train_set = make_train_set() if make_train_set is not None else None  # before the teacher is cast
    if make_teacher is not None:
        teacher = make_teacher()
    model = train_stage(
        context, stage, model, terms, train, teacher, train_set=train_set, wrap_loader=wrap_loader
    )
    add_timing(context, stage, time.perf_counter() - started)
    add_record(context, "peak_memory.json", stage, peak_memory())
    return model


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
) -> Any:
    """The distill stage's teacher: live (in ``teacher_dtype``), or replayed from ``teacher_cache``, which is
    checked against the stage's training data and (``check_weights``) against ``model``'s weights."""
    distill = config.distill
    if distill.teacher_cache:
        return CachedTeacher(
            distill.teacher_cache,
            teacher=model if check_weights else None,
            dataset=stage_train_set(train_set, distill.train.augment),
            terms=distill.terms,
            preload=preload,
        )
    dtype = None if distill.teacher_dtype == "float32" else getattr(torch, distill.teacher_dtype)
    return Teacher(model, distill.terms, dtype=dtype)


def transfer_data(context: RunContext) -> dict[str, Any]:
    """``make_train_set`` of a stage that learns from a teacher, when the run has a transfer set; else empty."""
    return {} if context.transfer is None else {"make_train_set": lambda: context.transfer}


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
            )
        }
    if on_policy is not None:
        return {
            "make_train_set": lambda: on_policy_data(context.train_set, on_policy),
            "wrap_loader": lambda loader, student: on_policy_loader(loader, student, on_policy, config.seed),
        }
    return {}
