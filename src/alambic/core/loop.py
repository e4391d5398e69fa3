"""The training loop: one function, readable on one screen.

Device placement, mixed precision and multiple processes come from Hugging Face Accelerate. The
distiller returns a dict of named, weighted losses; the loop sums nothing itself (``total`` is in
the dict), steps, logs, evaluates, checkpoints, resumes, and stops on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device
from torch import nn
from torch.utils.data import DataLoader, Sampler

from alambic.core.batches import index_of, split_batch
from alambic.core.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from alambic.core.distiller import Distiller, Teacher
from alambic.data.datasets import BatchedView
from alambic.errors import NonFiniteLossError
from alambic.files import dumps_json, writing


def make_accelerator(precision: str = "no") -> Accelerator:
    """The run's Accelerator: one process here; GPUs and several processes under ``accelerate launch``/``torchrun``.

    Without CUDA, several launched processes need ``cpu=True`` for Accelerate to form a gloo group.
    """
    from accelerate.state import AcceleratorState

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # Accelerate keeps one process-wide state; a second run in the same Python process with
        # another precision (distill(..., precision="bf16") after a float32 one) needs it reset.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=several and not torch.cuda.is_available())


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``, so a resumed run sees the same batches."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_loader(
    dataset, *, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling is reproducible per epoch (see :class:`EpochSampler`).

    A data set with ``get_batch`` (alambic's in-memory sets) returns whole batches, gathered from its
    tensors in one indexing operation instead of one sample at a time and a collate; batches are pinned
    in page-locked memory when a GPU is there to receive them.
    """
    batched = hasattr(dataset, "get_batch")
    return DataLoader(
        BatchedView(dataset) if batched else dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed, shuffle),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=already_batched if batched else None,
        pin_memory=torch.cuda.is_available(),
    )


def already_batched(batch: Any) -> Any:
    """The collate of data sets whose ``__getitems__`` returns a whole batch."""
    return batch


def make_optimizer(
    parameters,
    *,
    optimizer: str,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    fused: bool = False,
):
    """SGD (momentum, nesterov) or AdamW; ``fused`` runs the whole update as one kernel (on GPUs)."""
    parameters = [p for p in parameters if p.requires_grad]
    fused_option = {"fused": True} if fused else {}
    if optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
            **fused_option,
        )
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, **fused_option)


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, schedule: str, milestones: list[int], gamma: float
) -> float:
    """Linear warm-up to 1, then cosine to 0, step decay at milestone steps, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return gamma ** sum(step >= milestone for milestone in milestones)
    return 1.0


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main process only) and, optionally, to TensorBoard."""

    def __init__(
        self, path: str | Path | None, *, enabled: bool = True, tensorboard_dir: str | Path | None = None
    ):
        self.path = Path(path) if path and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # distill(run_dir="runs/new") creates it
        self.writer = None
        if tensorboard_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: alambic[tensorboard]

            self.writer = SummaryWriter(str(tensorboard_dir))

    def drop_after(self, stage: str, step: int) -> None:
        """Forget ``stage``'s records past ``step`` (a resumed run logs those steps again)."""
        if self.path is None or not self.path.is_file():
            return

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if not (record.get("stage") == stage and record.get("step", 0) > step):
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with writing(self.path), open(self.path, "a") as handle:
                handle.write(dumps_json(record) + "\n")
        if self.writer is not None:
            scalars = record.get("losses", {}) | {
                k: v for k, v in record.items() if k in ("accuracy", "lr", "macro_f1")
            }
            for key, value in scalars.items():
                self.writer.add_scalar(f"{record['stage']}/{record['kind']}/{key}", value, record["step"])
            self.writer.flush()


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


class FiniteGuard:
    """Records every micro-batch's losses on the device, one kernel a step; :meth:`check` reads them.

    ``watch`` writes the step's terms into a row of a device buffer (no host-device sync, no other
    work per step). ``check`` (at log steps and at the end of every epoch, before weights are evaluated
    or checkpointed) reads the rows since the last check in one transfer: it raises if a total was
    non-finite, naming the first such micro-batch's step and terms, and otherwise returns the terms'
    means over those rows, which the loop logs. Steps taken after a bad one are wasted but never
    saved: the last good checkpoint stays the one to resume from.
    """

    def __init__(self, accelerator: Accelerator, stage: str, capacity: int = 64):
        self.accelerator, self.stage, self.capacity = accelerator, stage, capacity
        self.rows: torch.Tensor | None = None  # [capacity, terms]
        self.names: list[str] = []
        self.steps: list[int] = []  # the optimizer step of each row (kept on the host: no sync)
        self.count = 0  # rows written since the last check

    def watch(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """Record this micro-batch's weighted terms and total; ``step`` is the optimizer step it belongs to."""
        if self.rows is None:
            self.names = list(losses)
            self.rows = torch.empty(self.capacity, len(losses), device=losses["total"].device)
        elif self.count == len(self.rows):  # more micro-batches between checks than expected
            self.rows = torch.cat([self.rows, torch.empty_like(self.rows)])
        torch.stack(
            [value.detach().float().reshape(()) for value in losses.values()], out=self.rows[self.count]
        )
        self.steps.append(step)
        self.count += 1

    def check(self, epoch: int) -> dict[str, float]:
        """Raise :class:`NonFiniteLossError` for a non-finite total; else the terms' means since the last check."""
        if not self.count:
            return {}
        rows = self.rows[: self.count]
        total = rows[:, self.names.index("total")]
        bad_here = (~torch.isfinite(total)).any().float().reshape(1)
        bad_anywhere = bad_here
        if self.accelerator.num_processes > 1:  # all processes stop together, or DDP would hang
            bad_anywhere = self.accelerator.reduce(bad_here, reduction="max")
        summary = torch.cat([bad_here, bad_anywhere, rows.mean(0)]).tolist()  # one transfer
        if summary[1] > 0:
            if summary[0] > 0:
                first = int((~torch.isfinite(total)).nonzero()[0])
                values = dict(zip(self.names, rows[first].tolist()))
                where, terms = f"step {self.steps[first]}", f" (terms: {values})"
            else:
                where, terms = "a step", " in another process"
            raise NonFiniteLossError(
                f"{self.stage}: the loss became non-finite at epoch {epoch}, {where}{terms}; lower the lr, "
                "add grad_clip, or check the inputs. The last good checkpoint is kept"
            )
        self.steps, self.count = [], 0
        return dict(zip(self.names, summary[2:]))


def fit(
    module: Distiller,
    train_loader: DataLoader,
    *,
    accelerator: Accelerator,
    teacher: Teacher | None = None,
    epochs: int,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
    grad_clip: float | None = None,
    eval_every: int = 1,
    log_every: int = 20,
    checkpoint_every: int = 1,
    checkpoint_dir: str | Path | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    log: MetricsLog | None = None,
    stage: str = "distill",
    progress: Callable[[str, int, int, dict], None] | None = None,  # (stage, step, total_steps, values)
    compile: bool = False,
    channels_last: bool = False,
    overlap_teacher: bool = False,
) -> nn.Module:
    """Train ``module`` (student + connectors) on its terms; resumes from ``checkpoint_dir`` when it holds one.

    ``grad_accum`` and ``precision`` live on the ``accelerator``. ``compile`` compiles the student's and
    the teacher's forward passes in place (``torch.compile``); ``channels_last`` stores convnets NHWC;
    ``overlap_teacher`` runs a live teacher's forward on a second CUDA stream, beside the student's (no
    effect without CUDA or with a cached teacher). ``evaluate(student)`` returns a dict
    with at least ``accuracy``; it runs every ``eval_every`` epochs and after the last.
    Returns the trained student (unwrapped).
    """
    log = log or MetricsLog(None)
    # connectors and learned losses are sized by one probing pass, before the optimizer sees the parameters
    if teacher is not None and module.needs_probe:
        probe_device = next(module.parameters()).device
        teacher.to(probe_device)
        probe_batch = send_to_device(next(iter(train_loader)), probe_device)
        num_samples = len(train_loader.dataset) if hasattr(train_loader.dataset, "__len__") else None
        module.build_modules(
            split_batch(probe_batch)[0], teacher, num_samples=num_samples, sample_index=index_of(probe_batch)
        )
    if channels_last:  # convnets run faster in NHWC on GPUs and with bf16 on recent CPUs
        module.student.to(memory_format=torch.channels_last)
        if isinstance(teacher, Teacher):
            teacher.model.to(memory_format=torch.channels_last)
    if compile:  # in place, so parameter names (checkpoints, exports) stay those of the plain module
        module.student.compile(dynamic=False)
        if isinstance(teacher, Teacher):
            teacher.model.compile(dynamic=False)
    fused = accelerator.device.type == "cuda"
    if fused:  # fused kernels want the parameters on the GPU when the optimizer is built (older torch)
        module.to(accelerator.device)
    optimizer_ = make_optimizer(
        module.parameters(),
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        fused=fused,
    )
    # Batches per epoch *per process*: with N processes each sees 1/N of the data, so the schedule
    # must be counted on the prepared (sharded) loader, not on the one given.
    loader = accelerator.prepare(train_loader)
    steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    factor = lambda step: lr_factor(  # noqa: E731
        step,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        schedule=schedule,
        milestones=[m * steps_per_epoch for m in (milestones or [])],
        gamma=gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer_, factor)
    sampler = train_loader.sampler
    if teacher is not None:
        teacher.to(accelerator.device)

    start_epoch, step = 0, 0
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is not None:
        last_epoch, step = load_training_state(
            latest,
            module=module,
            optimizer=optimizer_,
            scheduler=scheduler,
            process_index=accelerator.process_index,
        )
        start_epoch = last_epoch + 1
        log.drop_after(stage, step)  # records of the interrupted epoch are logged again

    model, optimizer_ = accelerator.prepare(module, optimizer_)
    unwrapped = accelerator.unwrap_model(model)
    guard = FiniteGuard(accelerator, stage)
    # One process, no accumulation, no autocast: Accelerate's per-step wrappers have nothing to do, and
    # cost about 0.4 ms a step on our 2-core CPU (its optimizer wrapper looks for an optional package
    # at every step); the plain calls do the same work. DeepSpeed, FSDP or XLA keep Accelerate's calls.
    plain = (
        accelerator.gradient_accumulation_steps == 1
        and accelerator.num_processes == 1
        and accelerator.mixed_precision == "no"
        and accelerator.distributed_type == DistributedType.NO
    )
    step_context = contextlib.nullcontext if plain else (lambda: accelerator.accumulate(model))
    autocast = contextlib.nullcontext if plain else accelerator.autocast
    backward = torch.Tensor.backward if plain else accelerator.backward
    stepper = getattr(optimizer_, "optimizer", optimizer_) if plain else optimizer_
    side_stream = (
        torch.cuda.Stream(accelerator.device)
        if overlap_teacher and accelerator.device.type == "cuda" and isinstance(teacher, Teacher)
        else None
    )
    if latest is None:  # one-line errors before step 0, on a real batch
        first_batch = send_to_device(next(iter(train_loader)), accelerator.device)
        unwrapped.check(*split_batch(first_batch), teacher, index_of(first_batch))
    for epoch in range(start_epoch, epochs):
        # Accelerate's loader counts epochs itself from 0; set it so a resumed run sees the same order.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        for batch, token_scale in _token_scaled(loader, accelerator, unwrapped.has_token_terms):
            inputs, labels = split_batch(batch)
            with step_context():
                with autocast():
                    if teacher is None or not unwrapped.needs_teacher:
                        teacher_outputs = None
                    elif side_stream is not None:  # waited for after the student's forward is launched
                        teacher_outputs = teacher.launch(inputs, index_of(batch), side_stream)
                    else:
                        teacher_outputs = teacher(inputs, index_of(batch))
                    losses = model(inputs, labels, teacher_outputs, epoch + 1, index_of(batch), token_scale)
                # no host-device sync here: checked (and averaged) when logging and at the epoch's end
                guard.watch(losses, step + 1)
                backward(losses["total"])
                synced = plain or accelerator.sync_gradients
                if synced and grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                stepper.step()
                stepper.zero_grad(set_to_none=True)
            if synced:
                scheduler.step()
                step += 1
                if step % log_every == 0:
                    means = guard.check(epoch + 1)
                    log.write(
                        {
                            "stage": stage,
                            "kind": "train",
                            "epoch": epoch + 1,
                            "step": step,
                            "lr": scheduler.get_last_lr()[0],
                            "losses": means,
                        }
                    )
                    if progress:
                        progress(stage, step, epochs * steps_per_epoch, means)
        guard.check(epoch + 1)  # before evaluating or checkpointing weights a non-finite step touched
        last = epoch + 1 == epochs
        if evaluate is not None and ((eval_every and (epoch + 1) % eval_every == 0) or last):
            metrics = evaluate(unwrapped.student)
            log.write(
                {
                    "stage": stage,
                    "kind": "eval",
                    "epoch": epoch + 1,
                    "step": step,
                    **{k: metrics[k] for k in ("accuracy", "macro_f1", "loss") if k in metrics},
                }
            )
            if progress:
                progress(stage, step, epochs * steps_per_epoch, {"test_accuracy": metrics["accuracy"]})
        if checkpoint_dir and ((epoch + 1) % checkpoint_every == 0 or last):
            save_training_state(
                checkpoint_dir,
                module=unwrapped,
                optimizer=optimizer_,
                scheduler=scheduler,
                epoch=epoch,
                step=step,
                process_index=accelerator.process_index,
                barrier=accelerator.wait_for_everyone,
            )
    return unwrapped.student
