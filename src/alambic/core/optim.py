"""The loop's machinery: the Accelerator, the optimizer, how a step runs and the learning-rate schedule.

A first training call in a process should not pay for the compiler it does not use. PyTorch marks the
optimizer's ``step``, ``zero_grad``, ``add_param_group``, ``state_dict`` and ``load_state_dict`` as not
to be traced by ``torch.compile``, and each mark imports ``torch._dynamo`` on its first call; Accelerate's
``prepare`` and ``unwrap_model`` import ``torch.distributed.tensor`` and ``torch._dynamo`` to look for
sharded or compiled models. Together 1.5-4 s on our CPU, paid once per process by the first ``distill()``
(issue 25). While ``torch._dynamo`` is not imported nothing can be compiled or traced, so the functions
beneath the marks do the same work, and a model that no loaded module could have sharded or compiled
needs none of those checks: :func:`dynamo_marks_deferred`, :class:`EagerSteps` and
:func:`prepare_for_training` take those shortcuts then, and only then. ``compile``, ``cuda_graphs`` or
your own ``torch.compile`` import ``torch._dynamo``, and from then on everything goes the usual way.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from alambic.core.monitor import check_trackers_installed
from alambic.errors import ConfigError
from alambic.models.loading import unwrap_model

# Optimizer methods PyTorch wraps in ``torch._disable_dynamo`` (whose first call imports torch._dynamo)
MARKED_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


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


def dynamo_loaded() -> bool:
    """Whether ``torch._dynamo`` is imported; until it is, nothing can be compiled or traced."""
    return "torch._dynamo" in sys.modules


def _marked_function(method: Any) -> tuple[Callable, bool] | None:
    """``(function, recursive)`` beneath a ``torch._disable_dynamo`` mark, or None if ``method`` is not one.

    The mark (torch/_compile.py) caches ``torch._dynamo.disable(function)`` in the function's
    ``__dynamo_disable`` attribute on its first call; it is recognised by reading that attribute."""
    code, cells = getattr(method, "__code__", None), getattr(method, "__closure__", None) or ()
    if code is None or "__dynamo_disable" not in code.co_names:
        return None
    free = dict(zip(code.co_freevars, (cell.cell_contents for cell in cells)))
    function = free.get("fn")
    return (function, bool(free.get("recursive", True))) if callable(function) else None


def _deferred_mark(function: Callable, recursive: bool) -> Callable:
    """What a mark calls while its cache holds this: ``function`` itself, or, once ``torch._dynamo`` is
    imported (a compiler may trace the caller from then on), what the mark would have cached, cached."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not dynamo_loaded():
            return function(*args, **kwargs)
        import torch._dynamo

        disabled = torch._dynamo.disable(function, recursive, wrapping=False)
        setattr(function, "__dynamo_disable", disabled)
        return disabled(*args, **kwargs)

    return call


@contextlib.contextmanager
def dynamo_marks_deferred() -> Iterator[None]:
    """Within it, the optimizer methods PyTorch marks as not to be compiled do not import ``torch._dynamo``
    while it is not imported (the marks' caches hold :func:`_deferred_mark`; removed on exit)."""
    deferred = []
    if not dynamo_loaded():
        for name in MARKED_METHODS:
            found = _marked_function(getattr(torch.optim.Optimizer, name, None))
            if found is not None and getattr(found[0], "__dynamo_disable", None) is None:
                setattr(found[0], "__dynamo_disable", _deferred_mark(*found))
                deferred.append((found[0], getattr(found[0], "__dynamo_disable")))
    try:
        yield
    finally:
        for function, mark in deferred:
            if getattr(function, "__dynamo_disable", None) is mark:
                delattr(function, "__dynamo_disable")


def _eager_step(optimizer_class: type) -> Callable | None:
    """``optimizer_class.step`` without its ``_use_grad_for_differentiable`` layer (which imports
    ``torch._dynamo`` at every call, for graph breaks that do nothing outside the compiler), keeping the
    rest: hooks and profiler range (``profile_hook_step``) around the grad mode PyTorch sets. None when
    the step is not shaped so (another torch, an optimizer of its own)."""
    hooked = optimizer_class.step
    use_grad = getattr(hooked, "__wrapped__", None)
    step = getattr(use_grad, "__wrapped__", None)
    hook = getattr(torch.optim.Optimizer, "profile_hook_step", None)
    if not getattr(hooked, "hooked", False) or hook is None or not callable(step):
        return None
    if getattr(getattr(use_grad, "__code__", None), "co_name", None) != "_use_grad":
        return None

    def grad_mode_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return step(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    return hook(grad_mode_step)


class EagerSteps:
    """An optimizer's ``step()`` and ``zero_grad()``: beneath PyTorch's compiler marks while ``torch._dynamo``
    is not imported (with :func:`dynamo_marks_deferred` for ``zero_grad``), the optimizer's own after."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.eager_step = _eager_step(type(optimizer))

    def step(self) -> Any:
        if self.eager_step is None or dynamo_loaded():
            return self.optimizer.step()
        if hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
            self.optimizer._opt_called = True  # what an LR scheduler's wrapper of step() records
        return self.eager_step(self.optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def plain_steps(accelerator: Accelerator) -> bool:
    """One process, no accumulation, no autocast: Accelerate's per-step wrappers have nothing to do."""
    return (
        accelerator.gradient_accumulation_steps == 1
        and accelerator.num_processes == 1
        and accelerator.mixed_precision == "no"
        and accelerator.distributed_type == DistributedType.NO
    )


def prepare_for_training(
    accelerator: Accelerator, module: nn.Module, optimizer: Any
) -> tuple[nn.Module, Any]:
    """``accelerator.prepare(module, optimizer)``; in the plain case (:func:`plain_steps`) while neither
    ``torch._dynamo`` nor ``torch.distributed.tensor`` is imported (so the model can be neither compiled
    nor sharded), the module moved to the device and the optimizer as they are: all that Accelerate's
    ``prepare`` would do then, less its look for DTensor parameters (which imports
    ``torch.distributed.tensor``, 0.7-2 s on our CPU) and an optimizer wrapper :class:`StepCalls`
    unwraps again. A compiler plugin (``accelerate config``) or a model dispatched over devices goes to
    Accelerate."""
    plugin = getattr(getattr(accelerator.state, "dynamo_plugin", None), "backend", None)
    if (
        plain_steps(accelerator)
        and plugin == "NO"
        and not dynamo_loaded()
        and "torch.distributed.tensor" not in sys.modules
        and not accelerator.verify_device_map(module)
    ):
        return (module.to(accelerator.device) if accelerator.device_placement else module), optimizer
    return accelerator.prepare(module, optimizer)


def unwrap_prepared(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """``accelerator.unwrap_model(model)``, whose check for a compiled model imports ``torch._dynamo``;
    while it is not imported (nothing compiled), DDP and DataParallel are unwrapped here. DeepSpeed, FSDP
    and XLA models go to Accelerate."""
    accelerate_own = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA)
    if dynamo_loaded() or accelerator.distributed_type in accelerate_own:
        return accelerator.unwrap_model(model)
    return unwrap_model(model)


@dataclass
class StepCalls:
    """How a step runs: Accelerate's wrappers, or the plain calls when they would have nothing to do.

    One process, no accumulation, no autocast: Accelerate's per-step wrappers cost about 0.4 ms a step on
    our 2-core CPU (its optimizer wrapper looks for an optional package at every step), and the plain
    calls do the same work (through :class:`EagerSteps`). DeepSpeed, FSDP or XLA keep Accelerate's calls.
    """

    plain: bool
    context: Callable[[], Any]  # accumulation window
    autocast: Callable[[], Any]
    backward: Callable[[torch.Tensor], None]
    optimizer: Any  # what .step() and .zero_grad() are called on

    @classmethod
    def choose(cls, accelerator: Accelerator, model: nn.Module, optimizer: Any) -> StepCalls:
        if plain_steps(accelerator):
            stepper = EagerSteps(getattr(optimizer, "optimizer", optimizer))
            return cls(True, contextlib.nullcontext, contextlib.nullcontext, torch.Tensor.backward, stepper)
        return cls(
            False,
            lambda: accelerator.accumulate(model),
            accelerator.autocast,
            accelerator.backward,
            optimizer,
        )
