"""Run a whole configured job: train or load a teacher, train a baseline, distill, evaluate, report.

The run directory holds ``config.yaml`` (resolved), ``status.json`` (running / completed / failed / interrupted),
``metrics.jsonl``, one folder per model (``teacher/``, ``baseline/``, ``student/``, each with
``model.safetensors`` once its stage is done and ``checkpoints/`` while it trains), ``summary.json``
and ``report.md`` with ``plots/``.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from alambic.config import RunConfig, load_config
from alambic.core.batches import example_input
from alambic.core.checkpoint import atomic_write_text
from alambic.core.lock import run_lock
from alambic.core.monitor import MetricsLog, Trackers
from alambic.core.optim import make_accelerator
from alambic.errors import AlambicError, first_line
from alambic.files import dumps_json, finite_json, writing
from alambic.run.augment import augment_probe_set
from alambic.run.building import build_run_datasets, build_run_transfer
from alambic.run.evaluation import (
    eval_loader,
    evaluation_progress,
    held_out_windows,
    parameter_count,
    summary_metrics,
)
from alambic.run.plan import describe
from alambic.run.planners import plan
from alambic.run.preflight import preflight
from alambic.run.report import write_report
from alambic.run.rundir import (
    check_run_dir,
    check_run_dir_state,
    prepare_run_dir,
    run_directory,
    write_status,
)
from alambic.run.seeds import seed_statistics
from alambic.run.stages import RunContext, augments, run_plan
from alambic.run.teacher_samples import write_teacher_samples


def run(
    config: RunConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: Any = None,
    datasets: tuple | None = None,
) -> Path:
    """Run the stages of ``config``; returns the run directory.

    ``datasets``: the ``(train, test, info)`` of :func:`~alambic.run.building.build_run_datasets`, when the
    caller has built them already (``alambic compress CONFIG``).

    Example:
        >>> from alambic.config import load_config
        >>> run_dir = run(load_config("recipes/digits.yaml"))
    """
    run_dir = run_directory(config, run_dir)
    check_run_dir_state(config, run_dir, resume=resume)  # cheap checks first
    accelerator = make_accelerator(
        config.precision, log_with=config.tracking.trackers, logging_dir=run_dir / "tracking"
    )
    datasets = datasets or build_run_datasets(config, run_dir=run_dir)
    # data.transfer read once, for the distill stage (the only one that sees it)
    transfer = build_run_transfer(config, datasets[0]) if "distill" in config.stages else None
    # every model built, every term tried on real data: nothing is written before this passes
    probe_transfer = augment_probe_set(config, datasets[0]) if augments(config) else transfer
    preflight(config, *datasets, run_dir=run_dir, transfer=probe_transfer)
    with run_lock(run_dir, accelerator):  # one writer per run directory (a second one is refused)
        prepare_run_dir(
            config,
            run_dir,
            resume=resume,
            is_main=accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
        )
        accelerator.wait_for_everyone()
        _execute(config, run_dir, accelerator, progress, datasets, transfer)
    return run_dir


def evaluate_run(run_dir: str | Path, *, data_dir: str | None = None, progress: Any = None) -> dict:
    """Re-evaluate the saved models of a run directory (and rebuild its report); returns the summary."""
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


def _execute(
    config: RunConfig,
    run_dir: Path,
    accelerator: Accelerator,
    progress: Any,
    datasets: tuple | None = None,
    transfer: Any = None,
) -> None:
    write_status(run_dir, accelerator, state="running", stage="data")
    try:
        train_set, test_set, info = datasets or build_run_datasets(config, run_dir=run_dir)
        tokenizer = getattr(info, "tokenizer", None)
        if tokenizer is not None and accelerator.is_main_process:  # a language model's, kept with its run
            with writing(run_dir / "tokenizer"):
                tokenizer.save(run_dir / "tokenizer")
        generated = getattr(info, "generated", None)
        if generated is not None and accelerator.is_main_process:  # teacher samples, reused on resume
            write_teacher_samples(run_dir, generated)
        log = MetricsLog(
            run_dir / "metrics.jsonl",
            enabled=accelerator.is_main_process,
            trackers=_trackers(config, run_dir, accelerator),
        )
        context = RunContext(
            config, run_dir, accelerator, train_set, test_set, info, log, progress, transfer=transfer
        )
        with log:  # ends the last stage's tracker runs
            models = run_plan(context, plan(config))
        if "evaluate" in config.stages:
            write_status(run_dir, accelerator, state="running", stage="evaluate")
            write_summary(context, models)
        if "report" in config.stages and accelerator.is_main_process:
            write_report(run_dir)
    except BaseException as error:
        message = first_line(error)
        state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"  # SIGTERM too (CLI)
        # the disk that failed the run may refuse this write too; the error raised says why
        with contextlib.suppress(AlambicError):
            write_status(run_dir, accelerator, state=state, error=message, error_type=type(error).__name__)
        raise
    write_status(run_dir, accelerator, state="completed")


def _trackers(config: RunConfig, run_dir: Path, accelerator: Accelerator) -> Trackers | None:
    """The run's experiment trackers (an accelerator made with ``log_with``): one tracker run per stage,
    in the project ``tracking.project`` (default: the run's name), files under ``RUN_DIR/tracking``."""
    if not accelerator.log_with:  # no tracking, or re-evaluating a run (alambic eval)
        return None
    tracking = config.tracking
    return Trackers(
        accelerator,
        tracking,
        project=tracking.project or config.name,
        run_name=tracking.run_name or run_dir.name,
        logging_dir=run_dir / "tracking",
        config=config.model_dump(mode="json", exclude={"tracking", "compress"}),
    )


def write_summary(context: RunContext, models: dict[str, nn.Module]) -> dict:
    """Evaluate every model on the test split and profile it; writes ``summary.json``."""
    accelerator, config, info = context.accelerator, context.config, context.info
    test_set, held_out = context.test_set, None
    if config.task == "causal-lm":  # evaluate.max_tokens: the same windows for every model
        test_set, held_out = held_out_windows(
            test_set, config.evaluate.max_tokens, parameter_count(*models.values())
        )
    test_loader = eval_loader(config, test_set, accelerator)
    example = example_input(test_set)
    architectures = context.architectures  # each model's, as its stage planned it
    teacher = models.get("teacher") if config.task == "causal-lm" else None  # every student's KL reference
    summary_models = {}
    for name, model in models.items():
        model = model.to(accelerator.device)
        reference = teacher.to(accelerator.device) if teacher is not None and name != "teacher" else None
        watch = evaluation_progress(
            context.progress, f"evaluate {name}", "windows" if held_out else "samples"
        )
        metrics = summary_metrics(
            config, model, test_loader, test_set, info, accelerator, example, reference, watch,
            rouge_progress=evaluation_progress(context.progress, f"evaluate {name} answers", "prompts"),
        )  # fmt: skip
        if accelerator.is_main_process:
            summary_models[name] = {"architecture": architectures.get(name), **metrics}
    summary = {}
    if accelerator.is_main_process:
        timings_path = context.run_dir / "timings.json"
        memory_path = context.run_dir / "peak_memory.json"
        stopping_path = context.run_dir / "stopping.json"
        summary = {
            "run_name": config.name,
            "dataset": config.data.dataset,
            "task": config.task,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "models": summary_models,
            # a language model's held-out windows (evaluate.max_tokens): how many, of how many, which rule
            **({"evaluation": held_out} if held_out is not None else {}),
            "stages_seconds": json.loads(timings_path.read_text()) if timings_path.is_file() else {},
            "stages_peak_memory": json.loads(memory_path.read_text()) if memory_path.is_file() else {},
            # "name": the key its weighted values are logged under in metrics.jsonl
            **({"seeds": seed_statistics(summary_models, config.seeds)} if config.seeds else {}),
            "terms": [{"name": term.name, **term.model_dump()} for term in config.distill.terms],
            "plan": describe(plan(config)),  # every stage, its folder, teacher and term weights
            # train.early_stopping / train.keep_best: the epoch a stage stopped at, the epoch it kept
            "stages_stopping": json.loads(stopping_path.read_text()) if stopping_path.is_file() else {},
        }
        # a NaN in the test inputs gives non-finite metrics: written as null and listed by name
        summary["non_finite"] = finite_json(summary["models"], "models")[1]
        atomic_write_text(context.run_dir / "summary.json", dumps_json(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
