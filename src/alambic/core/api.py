"""The Python entry point: :func:`distill` any ``nn.Module`` teacher into any student with any DataLoader,
and :func:`train_module`, the one function every training stage goes through."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from alambic.config.base import LoopSettings, Term, TrainConfig, format_validation_error
from alambic.config.tracking import TrackingConfig
from alambic.core.cache import CachedTeacher
from alambic.core.callbacks import Callback, History, PrintProgress, config_callbacks
from alambic.core.distiller import Distiller, Teacher
from alambic.core.evaluate import evaluate_classifier
from alambic.core.lock import run_lock
from alambic.core.loop import fit
from alambic.core.monitor import MetricsLog, Trackers
from alambic.core.optim import make_accelerator
from alambic.core.trainable import Trainable
from alambic.data.transfer import find_transfer
from alambic.errors import ConfigError
from alambic.models.keras import KerasModule, as_torch_module

HINTON_TERMS = ({"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}})


def as_terms(terms: Sequence[Term | dict] | None) -> list[Term]:
    """Terms from ``Term`` objects or plain dicts (``{"loss": "kd", "weight": 0.9, "params": {...}}``)."""
    result = []
    for index, term in enumerate(terms if terms is not None else HINTON_TERMS):
        try:
            result.append(term if isinstance(term, Term) else Term.model_validate(term))
        except ValidationError as error:
            raise ConfigError(f"terms[{index}]: {format_validation_error(error)}") from None
    return result


def distill(
    teacher: nn.Module | None, student: nn.Module, train_loader: DataLoader, *,
    terms: Sequence[Term | dict] | None = None, epochs: int = 1,
    eval_loader: DataLoader | None = None, num_classes: int | None = None, run_dir: str | Path | None = None,
    precision: str = "no", grad_accum: int = 1, seed: int | None = 0, accelerator: Any = None,
    teacher_vocab_size: int | None = None, teacher_dtype: torch.dtype | None = None,
    tracking: TrackingConfig | dict | list[str] | str | None = None,
    optimizer: str | Callable[[list], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None, callbacks: Sequence[Callback] = (),
    progress: bool | Callable[[str, int, int, dict], None] | None = None, return_history: bool = False,
    **train: Any,
) -> nn.Module | tuple[nn.Module, History]:  # fmt: skip
    """Distill ``teacher`` into ``student`` and return the trained student (and its history).

    Args:
        teacher: any module mapping inputs to logits (or an output with ``.logits``); frozen here.
            A :class:`~alambic.core.cache.CachedTeacher` replays stored outputs (batches must carry indices).
            ``None`` trains the student alone (terms must then need no teacher, e.g. ``ce``).
        student: the module to train; it must predict the teacher's number of classes.
        train_loader: yields ``(inputs, labels)`` tuples or dicts with a ``labels`` key; ``(inputs,
            labels, index)`` (see :class:`alambic.data.IndexedDataset`) for losses that keep per-sample
            state such as ``crd``. A loader over an :class:`alambic.data.TransferDataset` (unlabelled rows
            that only the teacher labels) has its label terms skip those rows.
        terms: the distillation terms; default Hinton KD: ``ce * 0.1 + kd(temperature=4) * 0.9``.
        epochs: passes over ``train_loader`` (ignored with ``max_steps=N``: exactly N optimizer steps, the
            schedule spanning them, the last epoch cut short).
        eval_loader: when given (with ``num_classes``), test accuracy is measured after each epoch.
        run_dir: where ``metrics.jsonl`` and resumable checkpoints go (created when missing); None keeps
            nothing on disk. One writer at a time: another process's ``distill`` or run there raises
            :class:`~alambic.core.lock.RunLockedError`.
        precision: ``"no"``, ``"bf16"`` or ``"fp16"`` autocast.
        grad_accum: micro-batches per optimizer step.
        seed: seeds Python, NumPy and torch before training (None leaves them alone).
        teacher_dtype: run a copy of the teacher in this dtype (``torch.bfloat16``: half the memory).
        tracking: experiment trackers, through Accelerate: ``["tensorboard", "wandb"]``, or
            ``{"trackers": [...], "project": ..., "run_name": ..., "init_kwargs": {"wandb": {...}}}``
            (:class:`alambic.config.TrackingConfig`); their files go under ``run_dir/tracking`` (``./tracking``
            without a run_dir). It builds the accelerator: not with ``accelerator``.
        teacher_vocab_size: slice the teacher's logits to this many entries, for a student of the same
            tokenizer whose vocabulary is not padded as the teacher's (a warning says so).
        optimizer: ``"sgd"`` (default) or ``"adamw"`` with ``lr``, ``momentum``, ``weight_decay``; or a
            function of the parameters that returns your optimizer (it must take every parameter it is
            given: connectors and learned losses exist only after a first probing batch), e.g.
            ``lambda params: torch.optim.AdamW(params, lr=3e-4)``.
        scheduler: a function of the optimizer returning an ``LRScheduler``, stepped once per optimizer
            step (``OneCycleLR(opt, max_lr=..., total_steps=epochs * len(train_loader))``); without it
            the named ``schedule`` applies (default cosine; ``schedule="constant"`` keeps your lr).
        callbacks: :class:`~alambic.core.callbacks.Callback` s (``EarlyStopping``, ``BestWeights``,
            ``History`` or your own); ``early_stopping={...}`` and ``keep_best="accuracy"`` add the first two.
        progress: a line on stdout every ``log_every`` steps (losses, tokens or samples/s, ETA) and per
            epoch; default on in a terminal or notebook, False for silence, or a ``progress(stage, step,
            total_steps, values)`` function called at every logged step.
        return_history: return ``(student, history)``, the per-epoch train losses and evaluations
            (:class:`~alambic.core.callbacks.History`), kept also without ``eval_loader``.
        **train: optimizer and schedule settings of :class:`alambic.config.TrainConfig`
            (``optimizer``, ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``schedule``,
            ``warmup_epochs``, ``milestones``, ``gamma``, ``grad_clip``, ``log_every``, ``max_steps``, ...).

    Example:
        >>> from alambic import distill
        >>> student = distill(teacher, student, train_loader, epochs=5, optimizer="adamw", lr=1e-3,
        ...                   terms=[{"loss": "ce", "weight": 0.1},
        ...                          {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}])
    """
    factory, settings = distill_settings(epochs, grad_accum, optimizer, train)
    callbacks, history, progress = distill_callbacks(settings, callbacks, return_history, progress)
    terms = as_terms(terms)
    accelerator, tracking, logging_dir = distill_accelerator(
        accelerator, tracking, precision, grad_accum, seed, run_dir, teacher_vocab_size
    )
    config = {"terms": [term.model_dump() for term in terms], **settings.model_dump()}
    with distill_log(accelerator, tracking, run_dir, logging_dir, config) as log:
        trained = train_module(
            distiller(student, terms, train_loader), train_loader, settings.loop(), accelerator=accelerator,
            teacher=_as_teacher(as_torch_module(teacher), terms, teacher_vocab_size, teacher_dtype),
            eval_loader=eval_loader, num_classes=num_classes, run_dir=run_dir, log=log, callbacks=callbacks,
            progress=progress if callable(progress) else None, optimizer=factory, scheduler=scheduler,
        )  # fmt: skip
    trained = trained.model if isinstance(trained, KerasModule) else trained
    return (trained, history) if history is not None else trained


def distill_settings(
    epochs: int, grad_accum: int, optimizer: Any, train: dict[str, Any]
) -> tuple[Callable[[list], torch.optim.Optimizer] | None, TrainConfig]:
    """``distill()``'s optimizer factory (None for a named optimizer) and training settings, or a one-line error."""
    if "augment" in train or "mix" in train:
        raise ConfigError(
            "distill() takes no augment or mix: augment in your dataset or DataLoader (run configs have "
            "data.augment and train.mix; alambic.strategies.MixedDataset wraps a data set)"
        )
    factory = None
    if optimizer is not None and not isinstance(optimizer, str):
        factory = optimizer if callable(optimizer) else _refuse_optimizer(optimizer)
        if given := sorted(set(train) & {"lr", "momentum", "nesterov", "weight_decay"}):
            raise ConfigError(f"{', '.join(given)}: set them in your optimizer function, not in distill()")
    elif optimizer is not None:
        train["optimizer"] = optimizer
    return factory, train_settings(epochs=epochs, grad_accum=grad_accum, **train)


def distill_callbacks(
    settings: TrainConfig, callbacks: Sequence[Callback], return_history: bool, progress: Any
) -> tuple[list[Callback], History | None, Any]:
    """The callbacks of ``settings`` (early stopping, best weights), the user's, then the history and the
    per-epoch progress lines; the history (or None) and ``progress`` decided (default: a person watches)."""
    callbacks = [*config_callbacks(settings), *callbacks]
    history = History() if return_history else None
    progress = _interactive() if progress is None else progress
    printer = PrintProgress() if progress is True else None  # also the loop's progress: every log_every steps
    callbacks += [item for item in (history, printer) if item]
    return callbacks, history, printer or progress


def distill_accelerator(
    accelerator: Any, tracking: Any, precision: str, grad_accum: int, seed: int | None, run_dir, vocab_size
) -> tuple[Accelerator, TrackingConfig, Path]:
    """The accelerator (the user's, or one built for ``precision`` and the trackers), the tracking
    settings and the trackers' folder; the seed set and a sliced vocabulary warned about on the way."""
    if vocab_size is not None:
        warnings.warn(
            f"the teacher's logits are sliced to its first {vocab_size} vocabulary entries "
            "(teacher_vocab_size): valid only when teacher and student share one tokenizer",
            stacklevel=3,
        )
    if seed is not None:
        set_seed(seed)
    tracking = tracking_settings(tracking, accelerator)
    logging_dir = Path(run_dir or ".") / "tracking"
    accelerator = accelerator or make_accelerator(
        precision, log_with=tracking.trackers, logging_dir=logging_dir
    )
    accelerator.gradient_accumulation_steps = grad_accum
    return accelerator, tracking, logging_dir


def distiller(student: Any, terms: list[Term], train_loader: Any) -> Distiller:
    """The trainable :class:`Distiller` of ``student`` (a Keras model wrapped); label terms skip the rows of
    a transfer set (:class:`alambic.data.TransferDataset`) under ``train_loader``."""
    module = as_torch_module(student)
    transfer = find_transfer(getattr(train_loader, "dataset", None))
    return Distiller(module, terms, unlabelled_rows=transfer is not None)


def _interactive() -> bool:
    """Whether a person is likely watching: stdout is a terminal, or this is a Jupyter kernel."""
    return sys.stdout.isatty() or "ipykernel" in sys.modules


def _refuse_optimizer(optimizer: Any) -> Any:
    raise ConfigError(
        f"optimizer must be 'sgd', 'adamw' or a function of the parameters, got a {type(optimizer).__name__} "
        "(the optimizer must also hold connector parameters built after a first batch); pass "
        "optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4)"
    )


def tracking_settings(tracking: Any, accelerator: Any) -> TrackingConfig:
    """``distill(tracking=...)`` as a :class:`TrackingConfig`, or a one-line error."""
    try:
        settings = (
            tracking
            if isinstance(tracking, TrackingConfig)
            else TrackingConfig.model_validate(tracking or [])
        )
    except ValidationError as error:
        raise ConfigError(f"tracking: {format_validation_error(error)}") from None
    if settings.trackers and accelerator is not None:
        raise ConfigError(
            "distill(tracking=...) builds its accelerator with log_with; leave accelerator out, or log "
            "from your own (Accelerator(log_with=...)) yourself"
        )
    return settings


def distill_log(accelerator: Accelerator, tracking: TrackingConfig, run_dir, logging_dir: Path, config: dict):
    """``distill()``'s :class:`MetricsLog`: ``run_dir/metrics.jsonl`` (when given) and the trackers."""
    trackers = None
    if tracking.trackers:
        trackers = Trackers(
            accelerator,
            tracking,
            project=tracking.project or "alambic",
            run_name=tracking.run_name or (Path(run_dir).name if run_dir else "distill"),
            logging_dir=logging_dir,
            config=config,
        )
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    return MetricsLog(path, enabled=accelerator.is_main_process, trackers=trackers)


def train_settings(**settings: Any) -> TrainConfig:
    """``TrainConfig(**settings)``, or a one-line error naming the setting that is wrong."""
    try:
        return TrainConfig(**settings)
    except ValidationError as error:
        raise ConfigError(f"invalid training setting: {format_validation_error(error)}") from None


def train_module(
    module: Trainable,
    train_loader: Any,
    settings: LoopSettings,
    *,
    accelerator: Accelerator,
    teacher: Any = None,
    eval_loader: Any = None,
    num_classes: int | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    run_dir: str | Path | None = None,
    log: MetricsLog | None = None,
    checkpoint_dir: str | Path | None = None,
    stage: str = "distill",
    progress: Callable[[str, int, int, dict], None] | None = None,
    callbacks: Sequence[Callback] = (),
    optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> nn.Module:
    """Train one stage: ``module`` on ``train_loader`` through the one loop; returns its trained student.

    Every way alambic trains goes through here: :func:`distill`, a strategy's module, each stage of a
    run, tuning trials, pruning recovery and quantization-aware training. ``eval_loader`` (with
    ``num_classes``) measures test accuracy after each evaluated epoch (or pass ``evaluate(student)``).
    ``run_dir`` holds ``metrics.jsonl`` and ``checkpoints/`` (created when missing) under an exclusive
    lock, so a second writer is refused; without it, ``log`` and ``checkpoint_dir`` say where to write.
    ``callbacks``, ``optimizer`` and ``scheduler`` (factories) go to :func:`~alambic.core.loop.fit`.

    Example:
        >>> student = train_module(Distiller(student, terms), loader, TrainConfig(epochs=5).loop(),
        ...                        accelerator=make_accelerator(), teacher=Teacher(teacher, terms))
    """
    if evaluate is None and eval_loader is not None:
        if num_classes is None:
            raise ConfigError("eval_loader needs num_classes (the number of classes the models predict)")
        prepared_eval = accelerator.prepare(eval_loader)
        evaluate = lambda model: evaluate_classifier(  # noqa: E731
            model, prepared_eval, num_classes=num_classes, accelerator=accelerator
        )
    run_dir = run_dir or None  # "" keeps nothing on disk, as None does
    # one writer per run directory (created here); a second one is refused in one line
    with run_lock(Path(run_dir), accelerator) if run_dir is not None else contextlib.nullcontext():
        if run_dir is not None:
            log = log or MetricsLog(Path(run_dir) / "metrics.jsonl", enabled=accelerator.is_main_process)
            checkpoint_dir = checkpoint_dir or Path(run_dir) / "checkpoints"
        return fit(
            module,
            train_loader,
            settings,
            accelerator=accelerator,
            teacher=teacher,
            checkpoint_dir=checkpoint_dir,
            evaluate=evaluate,
            log=log,
            stage=stage,
            progress=progress,
            callbacks=callbacks,
            optimizer=optimizer,
            scheduler=scheduler,
        )


def _as_teacher(teacher, terms, vocab_size: int | None, dtype) -> Teacher | None:
    """A module becomes a frozen :class:`Teacher`; a :class:`~alambic.core.cache.CachedTeacher` is used as it is."""
    if isinstance(teacher, CachedTeacher) and (vocab_size is not None or dtype is not None):
        raise ConfigError(
            "teacher_vocab_size and teacher_dtype apply to a live teacher; a CachedTeacher replays stored outputs"
        )
    if teacher is None or isinstance(teacher, CachedTeacher):
        return teacher
    return Teacher(teacher, terms, vocab_size=vocab_size, dtype=dtype)
