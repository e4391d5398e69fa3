"""The loop's machinery: the Accelerator, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alambic.core.monitor import check_trackers_installed
from alambic.errors import ConfigError


def make_accelerator(
    precision: str = "no", *, log_with: Sequence[str] = (), logging_dir: str | Path | None = None
) -> Accelerator:
    """The run's Accelerator: one process here; GPUs and several processes under ``accelerate launch``/``torchrun``.

    Without CUDA, several launched processes need ``cpu=True`` for Accelerate to form a gloo group.
    ``log_with``: experiment trackers (``tensorboard``, ``wandb``, ``mlflow``, ...; one-line error when one's
    package is missing), writing their files under ``logging_dir`` (see :class:`~alambic.core.monitor.Trackers`).
    """
    from accelerate.state import AcceleratorState

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # Accelerate keeps one process-wide state; a second run in the same Python process with
        # another precision (distill(..., precision="bf16") after a float32 one) needs it reset.
        AcceleratorState._reset_state()
    check_trackers_installed(list(log_with))
    return Accelerator(
        mixed_precision=precision,
        cpu=several and not torch.cuda.is_available(),
        log_with=list(log_with) or None,
        project_dir=str(logging_dir) if log_with and logging_dir is not None else None,
    )


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


def user_optimizer(
    factory: Callable[[list], Any], parameters: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """``factory(parameters)``: the user's optimizer over every trainable parameter (connectors included)."""
    if not callable(factory):
        raise ConfigError(
            f"optimizer must be 'sgd', 'adamw' or a function of the parameters, got {type(factory).__name__}; "
            "e.g. optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4)"
        )
    optimizer = factory(parameters)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"the optimizer function returned a {type(optimizer).__name__}, not a torch.optim.Optimizer; "
            "e.g. optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4)"
        )
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if given != {id(p) for p in parameters}:
        raise ConfigError(
            "the optimizer function must optimize the parameters it is given (student, connectors and "
            "learned losses), not others: build it from its argument, e.g. lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    return optimizer


def user_scheduler(factory: Callable[[Any], Any], optimizer: torch.optim.Optimizer) -> Any:
    """``factory(optimizer)``: the user's learning-rate scheduler, stepped once per optimizer step."""
    if not callable(factory):
        raise ConfigError(
            f"scheduler must be a function of the optimizer, got {type(factory).__name__}; e.g. "
            "scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=...) "
            "(named schedules are schedule='cosine' | 'step' | 'constant')"
        )
    scheduler = factory(optimizer)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or not isinstance(
        scheduler, torch.optim.lr_scheduler.LRScheduler
    ):
        raise ConfigError(
            f"the scheduler function returned a {type(scheduler).__name__}; it must return a "
            "torch.optim.lr_scheduler.LRScheduler stepped once per optimizer step (not ReduceLROnPlateau)"
        )
    if scheduler.optimizer is not optimizer:
        raise ConfigError("the scheduler function must schedule the optimizer it is given (its argument)")
    return scheduler
