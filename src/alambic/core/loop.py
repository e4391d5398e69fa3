"""The training loop: one function, readable on one screen, with its setup in the named helpers below it.

Device placement, mixed precision and multiple processes come from Hugging Face Accelerate. The
distiller returns a dict of named, weighted losses; the loop sums nothing itself (``total`` is in
the dict), steps, logs, evaluates, checkpoints, resumes, and stops on a non-finite loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device
from torch import nn
from torch.utils.data import DataLoader

from alambic.config.base import LoopSettings
from alambic.core.batches import index_of, split_batch
from alambic.core.callbacks import (
    Callback,
    Throughput,
    pack_states,
    train_metrics,
    unpack_states,
    wants_steps,
)
from alambic.core.checkpoint import latest_checkpoint, load_extra, load_training_state, save_training_state
from alambic.core.distiller import Teacher
from alambic.core.graphs import CompiledStep, check_cuda_graphs, graph_modules, tensor_learning_rates
from alambic.core.monitor import FiniteGuard, MetricsLog
from alambic.core.optim import (
    StepCalls,
    dynamo_marks_deferred,
    lr_factor,
    make_optimizer,
    prepare_for_training,
    unwrap_prepared,
    user_optimizer,
    user_scheduler,
)
from alambic.core.trainable import Trainable


def _counted_tokens(batch) -> torch.Tensor:
    """Tokens a causal-LM loss counts in a batch: next-token labels that are not -100 (all, without labels)."""
    inputs, labels = split_batch(batch)
    if labels is not None and labels.dim() >= 2:
        return (labels[:, 1:] != -100).sum().float()
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return torch.tensor(1.0)  # nothing to count by: every micro-batch weighs the same
    return torch.tensor(float(ids.shape[0] * (ids.shape[1] - 1)))


def _token_scaled(loader, accelerator: Accelerator, token_terms: bool):
    """Yield ``(batch, token_scale)``: token losses are normalised by the tokens of the whole accumulation window.

    A token loss averages over its micro-batch's ``n_i`` tokens, and Accelerate divides each
    micro-batch's loss by the ``k`` accumulation steps; scaling it by ``n_i k P / N`` (``N`` the tokens
    of the window across the ``P`` processes) makes the step's gradient that of ``sum / N``, as if the
    window were one batch, whatever the padding. Without token terms the scale is 1.
    """
    k = accelerator.gradient_accumulation_steps
    if not token_terms or (k == 1 and accelerator.num_processes == 1):
        for batch in loader:
            yield batch, None
        return
    window: list = []
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        if batch is not None:
            window.append(batch)
        if window and (batch is None or len(window) == k):
            counts = [_counted_tokens(item).to(accelerator.device) for item in window]
            total = torch.stack(counts).sum()
            if accelerator.num_processes > 1:
                total = accelerator.reduce(total, reduction="sum")
            for item, count in zip(window, counts):
                yield item, count * k * accelerator.num_processes / total.clamp_min(1.0)
            window = []
        if batch is None:
            return


def fit(
    module: Trainable,
    train_loader: DataLoader,
    settings: LoopSettings,
    *,
    accelerator: Accelerator,
    teacher: Any = None,
    checkpoint_dir: str | Path | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    log: MetricsLog | None = None,
    stage: str = "distill",
    progress: Callable[[str, int, int, dict], None] | None = None,  # (stage, step, total_steps, values)
    callbacks: Sequence[Callback] = (),
    optimizer: Callable[[list], Any] | None = None,
    scheduler: Callable[[Any], Any] | None = None,
) -> nn.Module:
    """Train ``module`` (student + what trains with it) on its terms; resumes from ``checkpoint_dir``.

    ``settings`` are the loop's (:class:`~alambic.config.LoopSettings`); ``grad_accum`` and ``precision``
    live on the ``accelerator``. ``teacher``: a :class:`~alambic.core.distiller.Teacher` or a cached one.
    ``evaluate(student)`` returns a dict with at least ``accuracy``; it runs every ``eval_every`` epochs
    and after the last. ``callbacks``: :class:`~alambic.core.callbacks.Callback` s (a stop ends training
    after its epoch). ``optimizer(params)`` / ``scheduler(optimizer)``: the user's factories, instead of
    ``settings.optimizer`` / ``settings.schedule``; the scheduler is stepped once per optimizer step.
    Returns the trained student (unwrapped).
    """
    log = log or MetricsLog(None)
    check_cuda_graphs(settings, accelerator)
    with dynamo_marks_deferred():  # no torch._dynamo import unless compile or cuda_graphs asks for it
        prepare_module(module, teacher, train_loader, settings, accelerator)
        optimizer = build_optimizer(module, settings, accelerator, optimizer)
        # Batches per epoch *per process*: with N processes each sees 1/N of the data, so the schedule
        # must be counted on the prepared (sharded) loader, not on the one given.
        loader = training_loader(train_loader, accelerator)
        steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
        total_steps = planned_steps(settings, steps_per_epoch)
        if scheduler is not None:
            scheduler = user_scheduler(scheduler, optimizer)
        else:
            scheduler = make_scheduler(optimizer, settings, steps_per_epoch)
        epochs = math.ceil(total_steps / steps_per_epoch) if steps_per_epoch else settings.epochs
        if teacher is not None:
            teacher.to(accelerator.device)
        start_epoch, step, stopped = resume(
            checkpoint_dir, module, optimizer, scheduler, accelerator, log, stage, callbacks
        )
        if stopped:  # a callback stopped this stage before it was interrupted: it is done
            start_epoch = epochs
        model, optimizer = prepare_for_training(accelerator, module, optimizer)
        calls = StepCalls.choose(accelerator, model, optimizer)
        if settings.cuda_graphs:  # one process, no accumulation, no loss scaler: nothing for Accelerate to do
            calls.optimizer = CompiledStep(getattr(optimizer, "optimizer", optimizer))
        state = LoopState(model=model, unwrapped=unwrap_prepared(accelerator, model), teacher=teacher,
                          loader=loader, calls=calls, scheduler=scheduler, guard=FiniteGuard(accelerator, stage),
                          settings=settings, accelerator=accelerator, log=log, stage=stage, progress=progress,
                          total_steps=total_steps, epochs=epochs,
                          side_stream=side_stream(settings, accelerator, teacher), step=step,
                          callbacks=list(callbacks), step_callbacks=[c for c in callbacks if wants_steps(c)],
                          evaluates=evaluate is not None, stop=stopped)  # fmt: skip
        train_epochs(state, train_loader, start_epoch, evaluate, checkpoint_dir, optimizer)
    return state.unwrapped.student


def build_optimizer(
    module: Trainable, settings: LoopSettings, accelerator: Accelerator, factory: Callable[[list], Any] | None
) -> Any:
    """The user's optimizer (``factory(params)``) or the one ``settings`` name, over the trainable parameters."""
    if factory is not None:
        optimizer = user_optimizer(factory, [p for p in module.parameters() if p.requires_grad])
    else:
        optimizer = make_optimizer(
            module.parameters(),
            **settings.model_dump(include={"optimizer", "lr", "momentum", "nesterov", "weight_decay"}),
            # compiled (cuda_graphs), the multi-tensor step is what the compiler fuses
            fused=accelerator.device.type == "cuda" and not settings.cuda_graphs,
        )
    if settings.cuda_graphs:
        tensor_learning_rates(optimizer)  # before the scheduler keeps the initial rates
    return optimizer


def train_epochs(
    state: LoopState,
    train_loader: DataLoader,
    start_epoch: int,
    evaluate: Callable[[nn.Module], dict] | None,
    checkpoint_dir: str | Path | None,
    optimizer: Any,
) -> None:
    """The epochs from ``start_epoch``: train, check the losses, evaluate, tell the callbacks, checkpoint."""
    settings, unwrapped, teacher = state.settings, state.unwrapped, state.teacher
    if start_epoch == 0:  # no checkpoint: one-line errors before step 0, on a real batch
        first_batch = send_to_device(next(iter(train_loader)), state.accelerator.device)
        unwrapped.check(*split_batch(first_batch), teacher, index_of(first_batch))
    for callback in state.callbacks:
        callback.on_fit_start(state)
    state.throughput = Throughput(state.accelerator.num_processes)
    for epoch in range(start_epoch, state.epochs):
        set_epoch(state.loader, train_loader.sampler, epoch)
        train_epoch(state, epoch)
        # before evaluating or checkpointing weights a non-finite step touched
        losses = train_metrics(epoch_losses(state, epoch))
        last = epoch + 1 == state.epochs
        metrics = {}
        if evaluate is not None and (
            (settings.eval_every and (epoch + 1) % settings.eval_every == 0) or last
        ):
            metrics = evaluate_and_log(state, evaluate, epoch)
        for callback in state.callbacks:
            callback.on_epoch_end(state, epoch + 1, {**metrics, **losses})
        if checkpoint_dir and ((epoch + 1) % settings.checkpoint_every == 0 or last or state.stop):
            save_checkpoint(state, checkpoint_dir, optimizer, epoch)
        state.throughput.restart()  # evaluating and checkpointing are not training time
        if state.stop:
            break
    for callback in state.callbacks:
        callback.on_fit_end(state)


def save_checkpoint(state: LoopState, checkpoint_dir: str | Path, optimizer: Any, epoch: int) -> None:
    """A resumable checkpoint after ``epoch``: weights, optimizer, schedule, RNG, callbacks and a stop."""
    plain, tensors = pack_states(state.callbacks)
    save_training_state(checkpoint_dir, module=state.unwrapped, optimizer=optimizer, scheduler=state.scheduler,
                        epoch=epoch, step=state.step, process_index=state.accelerator.process_index,
                        barrier=state.accelerator.wait_for_everyone,
                        extra={"stopped": state.stop, "callbacks": plain}, extra_tensors=tensors)  # fmt: skip


def epoch_losses(state: LoopState, epoch: int) -> dict[str, float]:
    """Check the last steps for non-finite losses and return the epoch's mean losses (per micro-batch)."""
    check_losses(state, epoch)
    sums, count = state.epoch_sums, state.epoch_rows
    state.epoch_sums, state.epoch_rows = {}, 0
    return {name: total / count for name, total in sums.items()} if count else {}


def check_losses(state: LoopState, epoch: int) -> dict[str, float]:
    """:meth:`FiniteGuard.check`, whose means are also summed into the epoch's."""
    rows = state.guard.count
    means = state.guard.check(epoch + 1)
    for name, value in means.items():
        state.epoch_sums[name] = state.epoch_sums.get(name, 0.0) + value * rows
    state.epoch_rows += rows if means else 0
    return means


@dataclass
class LoopState:
    """What every step and epoch of one :func:`fit` call shares."""

    model: nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    unwrapped: Trainable
    teacher: Any
    loader: Any
    calls: StepCalls
    scheduler: Any
    guard: FiniteGuard
    settings: LoopSettings
    accelerator: Accelerator
    log: MetricsLog
    stage: str
    progress: Callable[[str, int, int, dict], None] | None
    total_steps: int  # the stage's optimizer steps: max_steps, else epochs x steps per epoch
    epochs: int  # epochs run (the last one cut short when max_steps ends inside it)
    side_stream: Any  # a CUDA stream for the teacher's forward (overlap_teacher), else None
    step: int  # optimizer steps taken
    callbacks: list[Callback] = field(default_factory=list)
    step_callbacks: list[Callback] = field(default_factory=list)  # those that override on_step_end
    evaluates: bool = False  # whether an evaluation runs (at least after the last epoch)
    stop: bool = False  # set by a callback: training ends after this epoch
    epoch_sums: dict[str, float] = field(default_factory=dict)  # the epoch's losses, summed over rows
    epoch_rows: int = 0
    throughput: Throughput = field(default_factory=Throughput)  # tokens or samples a second, for progress

    @property
    def student(self) -> nn.Module:
        """The student being trained (unwrapped)."""
        return self.unwrapped.student


def train_epoch(state: LoopState, epoch: int) -> None:
    """One pass over the loader: forward (teacher, then student), backward, step, and log every ``log_every`` steps."""
    calls, teacher, unwrapped = state.calls, state.teacher, state.unwrapped
    state.model.train()
    for batch, token_scale in _token_scaled(state.loader, state.accelerator, unwrapped.has_token_terms):
        inputs, labels = split_batch(batch)
        if state.progress:
            state.throughput.add(inputs)
        with calls.context():
            with calls.autocast():
                if teacher is None or not unwrapped.needs_teacher:
                    teacher_outputs = None
                elif state.side_stream is not None:  # waited for after the student's forward is launched
                    teacher_outputs = teacher.launch(inputs, index_of(batch), state.side_stream)
                else:
                    teacher_outputs = teacher(inputs, index_of(batch))
                losses = state.model(inputs, labels, teacher_outputs, epoch + 1, index_of(batch), token_scale)
            # no host-device sync here: checked (and averaged) when logging and at the epoch's end
            state.guard.watch(losses, state.step + 1)
            calls.backward(losses["total"])
            synced = calls.plain or state.accelerator.sync_gradients
            if synced and state.settings.grad_clip is not None:
                state.accelerator.clip_grad_norm_(state.model.parameters(), state.settings.grad_clip)
            calls.optimizer.step()
            calls.optimizer.zero_grad(set_to_none=True)
        if synced:
            state.scheduler.step()
            state.step += 1
            if state.step_callbacks:
                for callback in state.step_callbacks:
                    callback.on_step_end(state)
            if state.step % state.settings.log_every == 0:
                means = check_losses(state, epoch)
                lr = float(state.scheduler.get_last_lr()[0])  # a tensor with cuda_graphs
                state.log.write({"stage": state.stage, "kind": "train", "epoch": epoch + 1, "step": state.step,
                                 "lr": lr, "losses": means})  # fmt: skip
                if state.progress:
                    values = means | {"epoch": epoch + 1} | state.throughput.rate()
                    state.progress(state.stage, state.step, state.total_steps, values)
            if state.settings.max_steps is not None and state.step >= state.total_steps:
                end = getattr(state.loader, "end", None)  # Accelerate's loader: the epoch ends here
                if end is not None:
                    end()
                return


def evaluate_and_log(state: LoopState, evaluate: Callable[[nn.Module], dict], epoch: int) -> dict:
    """Evaluate the student after ``epoch``, log its accuracy, macro-F1, loss (and a language model's
    perplexity), and return the evaluation."""
    metrics = evaluate(state.unwrapped.student)
    shown = {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "perplexity") if k in metrics}
    state.log.write({"stage": state.stage, "kind": "eval", "epoch": epoch + 1, "step": state.step, **shown})
    if state.progress:
        key = "perplexity" if "perplexity" in metrics else "accuracy"
        state.progress(
            state.stage, state.step, state.total_steps, {f"test_{key}": metrics[key], "epoch": epoch + 1}
        )
    return metrics


def prepare_module(
    module: Trainable, teacher: Any, train_loader: Any, settings: LoopSettings, accelerator: Accelerator
) -> None:
    """Before the optimizer sees the parameters: connectors and learned losses sized by one probing pass,
    the memory format, compilation, and (on a GPU) the parameters moved where the fused optimizer wants them."""
    if teacher is not None and module.needs_probe:
        probe_device = next(module.parameters()).device
        teacher.to(probe_device)
        probe_batch = send_to_device(next(iter(train_loader)), probe_device)
        num_samples = len(train_loader.dataset) if hasattr(train_loader.dataset, "__len__") else None
        module.build_modules(
            split_batch(probe_batch)[0], teacher, num_samples=num_samples, sample_index=index_of(probe_batch)
        )
    if settings.channels_last:  # convnets run faster in NHWC on GPUs and with bf16 on recent CPUs
        module.student.to(memory_format=torch.channels_last)
        if isinstance(teacher, Teacher):
            teacher.model.to(memory_format=torch.channels_last)
    if settings.cuda_graphs:  # the whole loss (student, connectors, terms) and a live teacher, as CUDA graphs
        graph_modules(module, teacher.model if isinstance(teacher, Teacher) else None)
    elif (
        settings.compile
    ):  # in place, so parameter names (checkpoints, exports) stay those of the plain module
        module.student.compile(dynamic=False)
        if isinstance(teacher, Teacher):
            teacher.model.compile(dynamic=False)
    if accelerator.device.type == "cuda":  # fused kernels want the parameters on the GPU (older torch)
        module.to(accelerator.device)


def planned_steps(settings: LoopSettings, steps_per_epoch: int) -> int:
    """The optimizer steps a stage takes: ``max_steps`` when set (``epochs`` ignored), else every epoch's."""
    return settings.max_steps if settings.max_steps is not None else settings.epochs * steps_per_epoch


def make_scheduler(optimizer: Any, settings: LoopSettings, steps_per_epoch: int) -> Any:
    """The learning-rate schedule of ``settings``, counted in optimizer steps (over ``max_steps`` when set)."""
    factor = lambda step: lr_factor(  # noqa: E731
        step,
        total_steps=planned_steps(settings, steps_per_epoch),
        warmup_steps=round(settings.warmup_epochs * steps_per_epoch),
        schedule=settings.schedule,
        milestones=[m * steps_per_epoch for m in settings.milestones],
        gamma=settings.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume(
    checkpoint_dir,
    module,
    optimizer,
    scheduler,
    accelerator: Accelerator,
    log: MetricsLog,
    stage: str,
    callbacks: Sequence[Callback] = (),
):
    """``(first epoch, optimizer steps taken, stopped by a callback)``: from the latest checkpoint in
    ``checkpoint_dir`` (the callbacks' states restored), else ``(0, 0, False)``."""
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is None:
        if checkpoint_dir:  # an attempt killed before its first checkpoint: its records are logged again
            log.drop_after(stage, None)
        return 0, 0, False
    last_epoch, step = load_training_state(
        latest,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        process_index=accelerator.process_index,
    )
    log.drop_after(stage, step)  # records of the interrupted epoch are logged again
    extra, tensors = load_extra(latest)
    unpack_states(callbacks, extra.get("callbacks", {}), tensors)
    return last_epoch + 1, step, bool(extra.get("stopped", False))


def side_stream(settings: LoopSettings, accelerator: Accelerator, teacher: Any) -> Any:
    """A second CUDA stream for a live teacher's forward (``overlap_teacher``), else None."""
    if settings.overlap_teacher and accelerator.device.type == "cuda" and isinstance(teacher, Teacher):
        return torch.cuda.Stream(accelerator.device)
    return None


def set_epoch(loader: Any, sampler: Any, epoch: int) -> None:
    """Accelerate's loader counts epochs itself from 0; set it so a resumed run sees the same order.
    A loader served directly (:class:`DeviceLoader`) tells its sampler and data set, as Accelerate would."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def training_loader(train_loader: Any, accelerator: Accelerator) -> Any:
    """What the epochs iterate: Accelerate's prepared (sharded) loader with several processes or gradient
    accumulation (its end-of-data flags drive the accumulation window), else the user's own DataLoader
    with its batches moved to the device (:class:`DeviceLoader`).

    In one process Accelerate's ``DataLoaderShard`` only adds per-batch bookkeeping (a recursive
    ``send_to_device`` even on a CPU, its state-dict updates, iterating one batch ahead): 10-30 us a batch
    on our CPU against 3-9 us for this path (``benchmarks/step_overhead.py``)."""
    direct = (
        isinstance(train_loader, DataLoader)
        and accelerator.num_processes == 1
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.distributed_type == DistributedType.NO
    )
    return DeviceLoader(train_loader, accelerator.device) if direct else accelerator.prepare(train_loader)


class DeviceLoader:
    """A DataLoader whose batches are moved to ``device`` (nothing to move on a CPU); length, sampler and
    data set are the loader's own."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type == "cpu":
            return iter(self.loader)
        return (
            send_to_device(batch, self.device, non_blocking=self.loader.pin_memory) for batch in self.loader
        )
