"""Callbacks: what a user adds to the loop (early stopping, the best weights, a history, their own logging).

A callback overrides the hooks it needs; the loop calls them at the start of :func:`~alambic.core.loop.fit`,
after every epoch and at the end. ``on_step_end`` is called only for callbacks that override it, so a run
without such a callback does no per-step work for callbacks. ``state`` is the loop's
:class:`~alambic.core.loop.LoopState`: ``state.student`` is the student being trained, ``state.step`` the
optimizer steps taken, ``state.stage`` the stage's name; setting ``state.stop = True`` ends training after
this epoch, cleanly (a checkpoint is written, the student returned; a resumed stopped stage is done).

``metrics`` at an epoch's end holds the evaluation's values when the epoch was evaluated (``accuracy``,
``macro_f1``, ``loss``, ... ; a language model's ``perplexity``) and the epoch's mean training losses as
``train_<term>`` (``train_total``, ``train_kd``, ...), also without an evaluation.

A callback that must survive a resume returns its state from ``state_dict`` (JSON values, or dicts of
tensors) and takes it back in ``load_state_dict``; it is stored in each checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alambic.config.base import TrainConfig
from alambic.core.batches import batch_size_of
from alambic.errors import ConfigError

# an ``auto`` mode maximises metrics whose name holds one of these, and minimises the others
# (losses, perplexity, bits per unit, KL)
HIGHER_IS_BETTER = ("acc", "f1", "auc", "agreement")


class Callback:
    """Base class: every hook does nothing; override those you need."""

    def on_fit_start(self, state: Any) -> None:
        """Before the first epoch (also when a resumed stage has no epoch left)."""

    def on_step_end(self, state: Any) -> None:
        """After every optimizer step (called only when overridden)."""

    def on_epoch_end(self, state: Any, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch`` (1-based), its evaluation and before its checkpoint."""

    def on_fit_end(self, state: Any) -> None:
        """After the last epoch and its checkpoint, before the student is returned."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as if uninterrupted (JSON values, or dicts of tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


def wants_steps(callback: Callback) -> bool:
    """Whether ``callback`` overrides ``on_step_end`` (the loop calls it at every step only then)."""
    return type(callback).on_step_end is not Callback.on_step_end


def train_metrics(losses: dict[str, float]) -> dict[str, float]:
    """An epoch's mean training losses as ``metrics`` holds them: ``train_<term>``."""
    return {f"train_{name}": value for name, value in losses.items()}


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The single numbers of an evaluation (not its per-class lists or confusion matrix)."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Monitored:
    """A metric watched for improvement: ``mode`` max, min or auto (max for accuracy, F1, AUC; else min)."""

    def __init__(self, monitor: str, mode: str = "auto", min_delta: float = 0.0):
        if mode not in ("auto", "max", "min"):
            raise ConfigError(f"mode must be 'auto', 'max' or 'min', got {mode!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ConfigError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor, self.min_delta = monitor, float(min_delta)
        if mode == "auto":
            mode = "max" if any(word in monitor.lower() for word in HIGHER_IS_BETTER) else "min"
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None

    def check_available(self, state: Any) -> None:
        """One line before step 0 when the monitored metric can never come (no evaluation)."""
        if not self.monitor.startswith("train_") and not state.evaluates:
            raise ConfigError(
                f"{type(self).__name__} monitors {self.monitor!r}, an evaluation metric, but nothing is "
                "evaluated: give an eval_loader (with num_classes), or monitor 'train_total'"
            )

    def improved(self, epoch: int, metrics: dict[str, Any]) -> bool | None:
        """True when ``metrics`` beats the best so far (and becomes it); None when not measured this epoch."""
        if self.monitor not in metrics:
            if any(not key.startswith("train_") for key in metrics) or self.monitor.startswith("train_"):
                shown = ", ".join(sorted(scalars(metrics)))
                raise ConfigError(f"{self.monitor!r} is not a metric of this run; it has: {shown}")
            return None  # this epoch was not evaluated
        value = float(metrics[self.monitor])
        if math.isnan(value):
            return False
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    Epochs without an evaluation (``eval_every``) are not counted. Example:
        >>> distill(teacher, student, loader, epochs=50, eval_loader=test, num_classes=10,
        ...         callbacks=[EarlyStopping("accuracy", patience=3)])
    """

    def __init__(
        self, monitor: str = "loss", *, patience: int = 3, min_delta: float = 0.0, mode: str = "auto"
    ):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(
                f"patience must be an integer >= 1 (evaluations without improvement), got {patience!r}"
            )
        self.watch = Monitored(monitor, mode, min_delta)
        self.patience = patience
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_fit_start(self, state: Any) -> None:
        self.watch.check_available(state)

    def on_epoch_end(self, state: Any, epoch: int, metrics: dict[str, float]) -> None:
        improved = self.watch.improved(epoch, metrics)
        if improved is None:
            return
        self.wait = 0 if improved else self.wait + 1
        if self.wait >= self.patience:
            state.stop, self.stopped_epoch = True, epoch

    def state_dict(self) -> dict[str, Any]:
        return {**self.watch.state_dict(), "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.watch.load_state_dict(state)
        self.wait, self.stopped_epoch = state.get("wait", 0), state.get("stopped_epoch")


class BestWeights(Callback):
    """Keep a CPU copy of the student's weights at its best ``monitor`` and restore them at the end.

    ``best_epoch`` says which epoch's weights the returned student holds. The copy is part of each
    checkpoint, so a resumed run restores the same weights.
    """

    def __init__(self, monitor: str = "loss", *, mode: str = "auto", min_delta: float = 0.0):
        self.watch = Monitored(monitor, mode, min_delta)
        self.weights: dict[str, torch.Tensor] | None = None

    @property
    def best_epoch(self) -> int | None:
        return self.watch.best_epoch

    def on_fit_start(self, state: Any) -> None:
        self.watch.check_available(state)

    def on_epoch_end(self, state: Any, epoch: int, metrics: dict[str, float]) -> None:
        if self.watch.improved(epoch, metrics):
            self.weights = {
                key: value.detach().to("cpu", copy=True) for key, value in state.student.state_dict().items()
            }

    def on_fit_end(self, state: Any) -> None:
        if self.weights is not None:
            state.student.load_state_dict(self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {**self.watch.state_dict(), "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.watch.load_state_dict(state)
        self.weights = state.get("weights")


class History(Callback):
    """Every epoch's metrics: ``records`` is a list of ``{"epoch": 1, "train_total": ..., "accuracy": ...}``.

    Example:
        >>> history = History()
        >>> distill(teacher, student, loader, epochs=5, callbacks=[history])
        >>> history["train_total"]     # [(1, 0.93), (2, 0.71), ...]: (epoch, value) where measured
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_epoch_end(self, state: Any, epoch: int, metrics: dict[str, float]) -> None:
        self.records.append({"epoch": epoch, **scalars(metrics)})

    def __getitem__(self, key: str) -> list[tuple[int, float]]:
        return [(record["epoch"], record[key]) for record in self.records if key in record]

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))


class PrintProgress(Callback):
    """One plain line per epoch: stage, epoch / epochs, step, mean training loss, evaluation, elapsed time;
    and, given to the loop as its ``progress`` function too, one every ``log_every`` optimizer steps
    (stage, step / steps, epoch, mean losses, tokens or samples a second, elapsed time, ETA)."""

    def __init__(self, print_line: Any = None):
        self.print_line = print_line or (lambda line: print(line, flush=True))
        self.started = 0.0
        self.first_step = 0

    def on_fit_start(self, state: Any) -> None:
        self.started, self.first_step = time.perf_counter(), state.step

    def __call__(self, stage: str, step: int, total: int, values: dict[str, float]) -> None:
        if any(key.startswith("test_") for key in values) or int(os.environ.get("RANK", "0")) != 0:
            return  # an evaluation: on the epoch's line
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        eta = f", ETA {(total - step) * elapsed / done:.1f} s" if done > 0 else ""
        losses = " ".join(
            f"{k} {v:.4g}" for k, v in values.items() if k != "epoch" and not k.endswith("_per_s")
        )
        rates = " ".join(
            f"{v:,.0f} {k.removesuffix('_per_s')}/s" for k, v in values.items() if k.endswith("_per_s")
        )
        epoch = f" epoch {values['epoch']}" if "epoch" in values else ""
        self.print_line(f"{stage} step {step}/{total}{epoch} {losses} {rates} ({elapsed:.1f} s{eta})")

    def on_epoch_end(self, state: Any, epoch: int, metrics: dict[str, float]) -> None:
        if not state.accelerator.is_main_process:
            return
        values = scalars(metrics)
        first = {"train_total": values.pop("train_total")} if "train_total" in values else {}
        shown = " ".join(f"{key} {value:.4g}" for key, value in (first | values).items())
        elapsed = time.perf_counter() - self.started
        self.print_line(
            f"{state.stage} epoch {epoch}/{state.epochs} step {state.step} {shown} ({elapsed:.1f} s)"
        )


class Throughput:
    """What the loop trains per second between two progress reports: tokens for token batches (dicts with
    ``input_ids`` ``[B, T]``; ``attention_mask`` counted when given), samples otherwise, over every process.

    Counts stay on the device (no host-device sync per step); :meth:`rate` reads them where the loop
    logs, which syncs there already."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self.unit = "samples"
        self.count: Any = 0
        self.since = time.perf_counter()

    def add(self, inputs: Any) -> None:
        """Count one micro-batch's inputs."""
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            mask = inputs.get("attention_mask")
            self.unit = "tokens"
            self.count = self.count + (mask.sum() if isinstance(mask, torch.Tensor) else ids.numel())
        else:
            self.count = self.count + batch_size_of(inputs)

    def rate(self) -> dict[str, float]:
        """``{"tokens_per_s" | "samples_per_s": value}`` since the last call (or :meth:`restart`)."""
        now = time.perf_counter()
        rate = float(self.count) * self.processes / max(now - self.since, 1e-9)
        self.count, self.since = 0, now
        return {f"{self.unit}_per_s": rate}

    def restart(self) -> None:
        """Forget what was counted (after an evaluation or a checkpoint: not training time)."""
        self.count, self.since = 0, time.perf_counter()


def pack_states(callbacks: Sequence[Callback]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The callbacks' states for a checkpoint: JSON values, and tensors (dicts of tensors) apart."""
    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for index, callback in enumerate(callbacks):
        key = f"{index}.{type(callback).__name__}"
        plain[key] = {}
        for entry, value in callback.state_dict().items():
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                tensors |= {f"{key}/{entry}/{name}": v.detach().contiguous() for name, v in value.items()}
            else:
                plain[key][entry] = value
    return plain, tensors


def unpack_states(
    callbacks: Sequence[Callback], plain: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Give each callback back what :func:`pack_states` stored for it (matched by position and class)."""
    for index, callback in enumerate(callbacks):
        key = f"{index}.{type(callback).__name__}"
        if key not in plain:
            continue  # a callback added on resume starts afresh
        state = dict(plain[key])
        for name, value in tensors.items():
            owner, entry, tensor_name = name.split("/", 2)
            if owner == key:
                state.setdefault(entry, {})[tensor_name] = value
        callback.load_state_dict(state)


def config_callbacks(train: TrainConfig) -> list[Callback]:
    """The callbacks a training config asks for: ``early_stopping`` and ``keep_best``."""
    callbacks: list[Callback] = []
    if train.keep_best is not None:
        callbacks.append(BestWeights(train.keep_best))
    if train.early_stopping is not None:
        callbacks.append(EarlyStopping(**train.early_stopping.model_dump()))
    return callbacks


def callbacks_report(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """What early stopping and kept weights did, for a run's summary (empty when neither took part)."""
    report: dict[str, Any] = {}
    for callback in callbacks:
        if isinstance(callback, EarlyStopping):
            report["early_stopping"] = {
                "monitor": callback.watch.monitor,
                "stopped_epoch": callback.stopped_epoch,
            }
        elif isinstance(callback, BestWeights):
            report["keep_best"] = {
                "monitor": callback.watch.monitor,
                "epoch": callback.best_epoch,
                "value": callback.watch.best,
            }
    return report
