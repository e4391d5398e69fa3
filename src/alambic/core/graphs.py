"""CUDA graphs for host-bound steps (``train.cuda_graphs``): the loss and the optimizer step compiled.

On a GPU, a small model's step (an MLP, a ResNet-20) takes microseconds of GPU time but launches
hundreds of kernels from Python; the host is the limit. ``torch.compile(mode="reduce-overhead")``
records the compiled kernels as CUDA graphs (PyTorch's cudagraph trees,
https://pytorch.org/docs/stable/torch.compiler_cudagraph_trees.html) and replays each with one launch:

- the trainable module's forward (student, connectors and terms: the whole loss) and its backward,
  compiled in place so parameter names (checkpoints, exports) stay those of the plain module;
- a live teacher's forward (in place too);
- the optimizer step, compiled with its learning rate held in a tensor so that the schedule changes
  it without a recompilation (PyTorch's "compiled optimizer with an LR scheduler" recipe,
  https://pytorch.org/tutorials/recipes/compiling_optimizer_lr_scheduler.html). alambic's own SGD /
  AdamW use the multi-tensor ("foreach") implementation here, which the compiler fuses into a few
  kernels (and makes capturable); an optimizer of your own is compiled as it is.

Shapes are static (``dynamic=False``): the last, shorter batch of an epoch records a second graph
once, then both are replayed, so every sample still trains (no ``drop_last``). Graph outputs are
overwritten by the next replay; the loop's non-finite watch copies each step's losses into its own
buffer (:class:`~alambic.core.monitor.FiniteGuard`), so nothing it keeps is a graph output.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from alambic.config.base import LoopSettings
from alambic.errors import ConfigError

# what the graphed modules and the optimizer step are compiled with (the step in the default mode: the
# compiler fuses it into a few kernels); tests on a machine without CUDA swap in backend="eager"
COMPILE_OPTIONS: dict[str, Any] = {"mode": "reduce-overhead", "dynamic": False}
STEP_OPTIONS: dict[str, Any] = {"dynamic": False}
GRAPH_DEVICES = ("cuda",)  # device types CUDA graphs can be recorded on


def check_cuda_graphs(settings: LoopSettings, accelerator: Accelerator) -> None:
    """One-line errors, before training, for what ``cuda_graphs`` cannot run with."""
    if not settings.cuda_graphs:
        return
    if accelerator.device.type not in GRAPH_DEVICES:
        raise ConfigError("train.cuda_graphs needs a CUDA GPU; use compile: true on CPU")
    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        raise ConfigError(
            "train.cuda_graphs runs in one process; with several (DDP, FSDP, DeepSpeed) use compile: true"
        )
    if accelerator.gradient_accumulation_steps > 1:
        raise ConfigError(
            "train.cuda_graphs needs grad_accum: 1 (gradients summed over several replays would live in "
            "the graphs' memory); raise batch_size instead, or use compile: true"
        )
    if accelerator.mixed_precision == "fp16":
        raise ConfigError(
            "train.cuda_graphs runs with precision no or bf16, not fp16 (the loss scaler skips steps "
            "on the host); use bf16"
        )
    if settings.overlap_teacher:
        raise ConfigError(
            "train.cuda_graphs and overlap_teacher: choose one (graphs replay on their own stream)"
        )


def graph_modules(module: torch.nn.Module, teacher_model: torch.nn.Module | None) -> None:
    """Compile the trainable module's forward (the whole loss) and a live teacher's, in place."""
    module.compile(**COMPILE_OPTIONS)
    if teacher_model is not None:
        teacher_model.compile(**COMPILE_OPTIONS)


def tensor_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Hold each group's learning rate in a 0-dim tensor, before the scheduler is built, so the
    compiled step reads it rather than baking it in as a constant (a recompilation at every change)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]))


class CompiledStep:
    """The optimizer as the loop calls it (``step()``, ``zero_grad()``), with ``step`` compiled.

    Compiled after the scheduler is built, so the scheduler's step counting is compiled with it. The
    first step compiles twice (before and after the optimizer's state exists); later ones replay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.step = torch.compile(optimizer.step, **STEP_OPTIONS)
        self.zero_grad = optimizer.zero_grad
