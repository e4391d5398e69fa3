"""Run a whole configured job: train or load a teacher, train a baseline, distill, evaluate, report.

The run directory holds ``config.yaml`` (resolved), ``status.json`` (running / completed / failed / interrupted),
``metrics.jsonl``, one folder per model (``teacher/``, ``baseline/``, ``student/``, each with
``model.safetensors`` once its stage is done and ``checkpoints/`` while it trains), ``summary.json``
and ``report.md`` with ``plots/``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from alambic.building import (
    build_named_model,
    check_num_classes,
    derive_from_teacher,
    example_input,
    hf_path,
)
from alambic.checkpoint import atomic_write_text, load_weights_file, save_weights
from alambic.config import RunConfig, TrainConfig, dump_config
from alambic.data import IndexedDataset
from alambic.distiller import Distiller, Teacher
from alambic.errors import AlambicError, ConfigError
from alambic.files import dumps_json, finite_json, writing
from alambic.preflight import preflight
from alambic.resume import check_resumable
from alambic.runlock import is_lock_file, run_lock
from alambic.train import MetricsLog, fit, make_accelerator, make_loader

MODEL_DIRS = {"teacher": "teacher", "baseline": "baseline", "distill": "student"}  # stage -> folder


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


def _status(run_dir: Path, accelerator: Accelerator, **fields: Any) -> None:
    if accelerator.is_main_process:
        record = {"updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
        atomic_write_text(run_dir / "status.json", dumps_json(record, indent=2))


def check_run_dir_state(config: RunConfig, run_dir: Path, *, resume: bool) -> list[str]:
    """Before anything is written: a new run needs a free directory; a resumed one, a run directory whose
    started stages keep their settings under ``config`` (see :mod:`alambic.resume`). Returns the changes a
    resume makes to the stored config (empty for a new run or the same config)."""
    stored = run_dir / "config.yaml"
    if resume:
        if not stored.is_file():
            raise ConfigError(
                f"--resume {run_dir}: no config.yaml there; is it a run directory written by alambic?"
            )
        if stored.read_text() == dump_config(config):
            return []
        previous = read_stored_config(stored)
        return check_resumable(run_dir, previous, config.model_dump(mode="json"))
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a folder; give --out a new folder's path")
    if run_dir.exists() and any(not is_lock_file(path) for path in run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists; continue it with --resume {run_dir}, "
            "or pick another name (--set name=...) or --out"
        )
    return []


def read_stored_config(path: Path) -> dict:
    """A run directory's ``config.yaml`` as a resolved dict (validated, so older files gain new defaults)."""
    from alambic.config import load_config

    try:
        return load_config(path).model_dump(mode="json")
    except ConfigError as error:
        raise ConfigError(
            f"{path} cannot be read back ({error}); it was not written by this version"
        ) from None


def prepare_run_dir(
    config: RunConfig, run_dir: Path, *, resume: bool, is_main: bool, barrier: Any = None
) -> None:
    """Create the run directory, or check that a resumed one can continue under ``config``.

    A resume with a corrected config (see :mod:`alambic.resume`) keeps the previous one beside it as
    ``config.before-<UTC time>.yaml`` and stores the new one as ``config.yaml``.
    """
    changes = check_run_dir_state(config, run_dir, resume=resume)
    if barrier is not None:
        barrier()  # every process has checked before the main one writes
    if not is_main:
        return
    stored = run_dir / "config.yaml"
    if resume:
        if changes:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            atomic_write_text(run_dir / f"config.before-{stamp}.yaml", stored.read_text())
            atomic_write_text(stored, dump_config(config))
        return
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, dump_config(config))


def _train_stage(
    context: RunContext,
    stage: str,
    model: nn.Module,
    terms,
    train: TrainConfig,
    teacher: Teacher | None,
    module: nn.Module | None = None,
) -> nn.Module:
    """Train ``model`` with ``terms`` (resuming from its checkpoints) and save it as ``model.safetensors``.

    ``module``: a trainable module of its own (a strategy's, with the Distiller interface) instead of
    ``Distiller(model, terms)``."""
    from alambic.evaluate import evaluate_classifier

    accelerator = context.accelerator
    folder = context.run_dir / MODEL_DIRS.get(stage, stage)
    accelerator.gradient_accumulation_steps = train.grad_accum
    loader = make_loader(
        stage_train_set(context.train_set, train.augment, train.mix, train.mix_alpha),
        batch_size=train.batch_size,
        shuffle=True,
        seed=context.config.seed,
        num_workers=context.config.data.num_workers,
    )
    test_loader = accelerator.prepare(
        make_loader(context.test_set, batch_size=context.config.data.eval_batch_size, shuffle=False)
    )
    module = module if module is not None else Distiller(model, terms)
    student = fit(
        module,
        loader,
        accelerator=accelerator,
        teacher=teacher,
        stage=stage,
        log=context.log,
        checkpoint_dir=folder / "checkpoints",
        progress=context.progress,
        evaluate=lambda student: evaluate_classifier(
            student, test_loader, num_classes=context.info.num_classes, accelerator=accelerator
        ),
        **train.model_dump(exclude={"batch_size", "grad_accum", "augment", "mix", "mix_alpha"}),
    )
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
        from alambic.strategies.mixing import MixedDataset

        train_set = MixedDataset(train_set, mix, mix_alpha)
    return IndexedDataset(train_set)


def _load_or_train(
    context: RunContext, stage: str, build, terms, train: TrainConfig, teacher=None, make_teacher=None
) -> nn.Module:
    """A finished stage's weights are loaded (this is how --resume skips it); otherwise the stage trains.

    ``make_teacher()`` builds the teacher only when the stage trains (a finished run re-evaluated
    without its teacher cache folder still works).
    """
    set_seed(context.config.seed)
    model = build()
    weights = context.run_dir / MODEL_DIRS.get(stage, stage) / "model.safetensors"
    if weights.is_file():
        load_finished_stage(model, weights, stage)
        return model
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if make_teacher is not None:
        teacher = make_teacher()
    model = _train_stage(context, stage, model, terms, train, teacher)
    _add_timing(context, stage, time.perf_counter() - started)
    _add_record(context, "peak_memory.json", stage, peak_memory())
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


def _add_timing(context: RunContext, stage: str, seconds: float) -> None:
    _add_record(context, "timings.json", stage, round(seconds, 3))


def _add_record(context: RunContext, file: str, stage: str, value: Any) -> None:
    if context.accelerator.is_main_process:
        path = context.run_dir / file
        records = json.loads(path.read_text()) if path.is_file() else {}
        records[stage] = value
        atomic_write_text(path, dumps_json(records, indent=2))


def run(
    config: RunConfig, *, run_dir: str | Path | None = None, resume: bool = False, progress: Any = None
) -> Path:
    """Run the stages of ``config``; returns the run directory.

    Example:
        >>> from alambic.config import load_config
        >>> run_dir = run(load_config("recipes/digits.yaml"))
    """
    run_dir = run_directory(config, run_dir)
    check_run_dir_state(config, run_dir, resume=resume)  # cheap checks first
    accelerator = make_accelerator(config.precision)
    datasets = build_run_datasets(config)
    # every model built, every term tried on real data: nothing is written before this passes
    preflight(
        config,
        *datasets,
        stage_train_set,
        teacher_trained=(run_dir / "teacher" / "model.safetensors").is_file(),
    )
    with run_lock(run_dir, accelerator):  # one writer per run directory (a second one is refused)
        prepare_run_dir(
            config,
            run_dir,
            resume=resume,
            is_main=accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
        )
        accelerator.wait_for_everyone()
        _execute(config, run_dir, accelerator, progress, datasets)
    return run_dir


def run_directory(config: RunConfig, run_dir: str | Path | None = None) -> Path:
    """The run directory: ``run_dir`` when given, else ``output_dir/name``."""
    return Path(run_dir) if run_dir else Path(config.output_dir) / config.name


def evaluate_run(run_dir: str | Path, *, data_dir: str | None = None, progress: Any = None) -> dict:
    """Re-evaluate the saved models of a run directory (and rebuild its report); returns the summary."""
    from alambic.config import load_config

    run_dir = check_run_dir(run_dir)
    config = load_config(run_dir / "config.yaml")
    config.stages = ["evaluate", "report"]
    if data_dir is not None:
        config.data.data_dir = data_dir
    accelerator = make_accelerator(config.precision)
    status_path = run_dir / "status.json"
    with run_lock(run_dir, accelerator):
        status = status_path.read_text() if status_path.is_file() else None
        try:
            _execute(config, run_dir, accelerator, progress)
        finally:  # re-evaluating does not change how the run itself ended
            if status is not None and accelerator.is_main_process:
                atomic_write_text(status_path, status)
    return json.loads((run_dir / "summary.json").read_text())


def build_run_datasets(
    config: RunConfig, *, data_dir: str | None = None, augment: bool | None = None, subset: bool = True
) -> tuple[Any, Any, Any]:
    """The train and test sets of a run config, and their info.

    ``data_dir`` overrides ``data.data_dir``; ``augment`` overrides ``data.augment``; ``subset=False``
    ignores ``data.train_subset`` (the whole training set, e.g. for calibration).
    """
    from alambic.data import build_datasets

    data = config.data
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
    )


def run_tokenizer(config: RunConfig) -> str | None:
    """The tokenizer of a run's text data: ``data.tokenizer``, else the ``hf:`` teacher's own."""
    if config.data.tokenizer:
        return config.data.tokenizer
    return hf_path(config.teacher.model.arch) if config.teacher else None


def _execute(
    config: RunConfig, run_dir: Path, accelerator: Accelerator, progress: Any, datasets: tuple | None = None
) -> None:
    _status(run_dir, accelerator, state="running", stage="data")
    try:
        train_set, test_set, info = datasets or build_run_datasets(config)
        log = MetricsLog(
            run_dir / "metrics.jsonl",
            enabled=accelerator.is_main_process,
            tensorboard_dir=run_dir / "tensorboard" if config.tensorboard else None,
        )
        context = RunContext(config, run_dir, accelerator, train_set, test_set, info, log, progress)
        models = _run_stages(context)
        if "evaluate" in config.stages:
            _status(run_dir, accelerator, state="running", stage="evaluate")
            write_summary(context, models)
        if "report" in config.stages and accelerator.is_main_process:
            from alambic.report import write_report

            write_report(run_dir)
    except BaseException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"  # SIGTERM too (CLI)
        # the disk that failed the run may refuse this write too; the error raised says why
        with contextlib.suppress(AlambicError):
            _status(run_dir, accelerator, state=state, error=message, error_type=type(error).__name__)
        raise
    _status(run_dir, accelerator, state="completed")


def _run_stages(context: RunContext) -> dict[str, nn.Module]:
    config, info = context.config, context.info
    if config.strategy is not None:
        from alambic.strategies.stages import run_strategy_stages

        return run_strategy_stages(context)
    stages, models = config.stages, {}
    example = example_input(context.test_set)

    def build_teacher() -> nn.Module:
        model = build_named_model(config.teacher.model, info, "teacher")
        check_num_classes(model, example, info.num_classes, "teacher")
        return model

    def build_student() -> nn.Module:  # baseline and distilled students start from the same weights
        if derived:  # from the trained teacher's layers (DistilBERT); a copy, so the teacher stays intact
            model = derive_from_teacher(models["teacher"], config.student.model)
        else:
            model = build_named_model(config.student.model, info, "student")
        check_num_classes(model, example, info.num_classes, "student")
        return model

    derived = config.student.model.arch == "derive:teacher"
    needs_teacher = derived or "teacher" in stages or "distill" in stages or "evaluate" in stages
    if needs_teacher:
        teacher_trained = (context.run_dir / "teacher" / "model.safetensors").is_file()
        if config.teacher.model.checkpoint and not teacher_trained:
            models["teacher"] = build_teacher()
        elif "teacher" in stages or teacher_trained:
            _status(context.run_dir, context.accelerator, state="running", stage="teacher")
            models["teacher"] = _load_or_train(
                context, "teacher", build_teacher, config.teacher.terms, config.teacher.train
            )
        else:
            raise ConfigError(
                "distill needs a teacher: add the 'teacher' stage or give teacher.model.checkpoint"
            )
    if "baseline" in stages or (context.run_dir / "baseline" / "model.safetensors").is_file():
        _status(context.run_dir, context.accelerator, state="running", stage="baseline")
        train = config.baseline.train or config.distill.train
        models["baseline"] = _load_or_train(context, "baseline", build_student, config.baseline.terms, train)
    if "distill" in stages or (context.run_dir / "student" / "model.safetensors").is_file():
        _status(context.run_dir, context.accelerator, state="running", stage="distill")
        models["distilled"] = _load_or_train(
            context,
            "distill",
            build_student,
            config.distill.terms,
            config.distill.train,
            make_teacher=lambda: distill_teacher(context, models["teacher"]),
        )
    return models


def distill_teacher(context: RunContext, model: nn.Module):
    """The distill stage's teacher: live (in ``teacher_dtype``), or replayed from ``teacher_cache``."""
    distill = context.config.distill
    if distill.teacher_cache:
        from alambic.cache import CachedTeacher

        return CachedTeacher(
            distill.teacher_cache,
            teacher=model,
            dataset=stage_train_set(context.train_set, distill.train.augment),
            terms=distill.terms,
        )
    dtype = None if distill.teacher_dtype == "float32" else getattr(torch, distill.teacher_dtype)
    return Teacher(model, distill.terms, dtype=dtype)


def write_summary(context: RunContext, models: dict[str, nn.Module]) -> dict:
    """Evaluate every model on the test split and profile it; writes ``summary.json``."""
    from alambic.evaluate import evaluate_classifier, profile_model

    accelerator, config, info = context.accelerator, context.config, context.info
    test_loader = accelerator.prepare(
        make_loader(context.test_set, batch_size=config.data.eval_batch_size, shuffle=False)
    )
    example = example_input(context.test_set)
    architectures = {
        "teacher": config.teacher.model.arch if config.teacher else None,
        "baseline": config.student.model.arch,
        "distilled": config.student.model.arch,
        **context.architectures,
    }
    summary_models = {}
    for name, model in models.items():
        model = model.to(accelerator.device)
        metrics = evaluate_classifier(
            model, test_loader, num_classes=info.num_classes, accelerator=accelerator
        )
        if accelerator.is_main_process:
            profile = profile_model(
                model.to("cpu"),
                example,
                batch_sizes=tuple(config.evaluate.batch_sizes),
                repeats=config.evaluate.latency_repeats,
                threads=config.evaluate.latency_threads,
            )
            # a class absent from the test split has no accuracy: null, not NaN, keeps the JSON strict
            metrics["per_class_accuracy"] = [None if v != v else v for v in metrics["per_class_accuracy"]]
            summary_models[name] = {"architecture": architectures[name], **metrics, **profile}
    summary = {}
    if accelerator.is_main_process:
        timings_path = context.run_dir / "timings.json"
        memory_path = context.run_dir / "peak_memory.json"
        summary = {
            "run_name": config.name,
            "dataset": config.data.dataset,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "models": summary_models,
            "stages_seconds": json.loads(timings_path.read_text()) if timings_path.is_file() else {},
            "stages_peak_memory": json.loads(memory_path.read_text()) if memory_path.is_file() else {},
            "terms": [term.model_dump() for term in config.distill.terms],
        }
        # a NaN in the test inputs gives non-finite metrics: written as null and listed by name
        summary["non_finite"] = finite_json(summary["models"], "models")[1]
        atomic_write_text(context.run_dir / "summary.json", dumps_json(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def check_run_dir(run_dir: str | Path) -> Path:
    """A run directory written by alambic, or a one-line error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise AlambicError(
            f"{run_dir} is not an alambic run directory (no config.yaml); pass the folder `alambic run` wrote"
        )
    return run_dir


def evaluate_checkpoint(
    path: str | Path, *, arch: str, dataset: str, data_dir: str | None = None, kwargs: dict | None = None
) -> dict:
    """Evaluate one checkpoint (safetensors or a torch checkpoint read weights_only) on a data set's test split."""
    from alambic.config import ModelConfig
    from alambic.data import build_datasets
    from alambic.evaluate import evaluate_classifier, profile_model

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


def cache_teacher_outputs(
    config: RunConfig, out_dir: str | Path, *, top_k: int | None = None, dtype: str = "float32"
) -> dict:
    """``alambic cache-teacher``: run the config's trained teacher once over its training set; returns the manifest.

    Stores the logits and every teacher feature the distill terms compare. The teacher comes from
    ``teacher.model.checkpoint`` (a run's ``teacher/model.safetensors`` works).
    """
    from alambic.cache import cache_teacher
    from alambic.distiller import _feature_paths
    from alambic.losses import get_loss_spec

    trained_in_run = config.teacher is not None and "teacher" in config.stages and config.teacher.train
    if config.teacher is None or not (
        config.teacher.model.checkpoint
        or (config.teacher.model.arch.startswith("hf:") and not trained_in_run)
    ):
        raise ConfigError(
            "cache-teacher needs a trained teacher: give teacher.model.checkpoint "
            "(for example --set teacher.model.checkpoint=runs/NAME/teacher/model.safetensors)"
        )
    train_set, _, info = build_run_datasets(config)
    teacher = build_named_model(config.teacher.model, info)
    terms = [term for term in config.distill.terms if get_loss_spec(term.loss).needs_teacher]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return cache_teacher(
        teacher,
        stage_train_set(train_set, config.distill.train.augment),
        out_dir,
        features=list(dict.fromkeys(_feature_paths(terms, "teacher"))),
        top_k=top_k,
        dtype=dtype,
        batch_size=config.data.eval_batch_size,
        device=device,
    )
