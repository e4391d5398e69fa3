"""Pruning: global magnitude (unstructured) and structured channel pruning, then recovery by distillation.

- :func:`magnitude_prune` zeroes the smallest weights of every Linear and Conv2d layer together (one
  global threshold, ``torch.nn.utils.prune.global_unstructured`` with L1), and by default makes it
  permanent (``prune.remove``: the zeros are in ``weight``, no mask is left). The file does not shrink
  (zeros take as many bytes), but a sparse runtime or compression can use them; :func:`weight_sparsity`
  says how many there are.
- :func:`channel_prune` removes output channels / hidden units, so the model really shrinks: fewer
  parameters, FLOPs and bytes. Channels are ranked by the L1 norm of their filter (Li et al. 2017,
  "Pruning Filters for Efficient ConvNets", https://arxiv.org/abs/1608.08710). Supported: the zoo's
  ``mlp`` (hidden units), ``cnn`` (every block's channels) and CIFAR ResNets (the inner channels of each
  residual block, which no shortcut depends on).
- :func:`recover` distills the pruned model from the unpruned one with :func:`alambic.distill`; the
  weights pruning zeroed stay zero while it trains.

A structurally pruned model is saved as plain safetensors; :func:`alambic.models.surgery.load_resized` rebuilds
it from its architecture and that file.

Example:
    >>> small = channel_prune(student, ratio=0.5)
    >>> small = recover(small, student, train_loader, epochs=2, lr=0.01)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from alambic.compress.head_pruning import prune_heads_by_importance
from alambic.core.api import distill
from alambic.errors import ConfigError
from alambic.models.cifar_resnet import CifarResNet, OptionABlock, OptionBBlock, WideCifarResNet
from alambic.models.surgery import slice_in, slice_norm, slice_out
from alambic.models.zoo import MLP, SmallCNN

PRUNE_METHODS = ("magnitude", "channel", "heads")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv2d layers of ``model`` with their module paths."""
    return [
        (name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)
    ]


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """Fraction of exactly-zero weights in the Linear and Conv2d layers, overall and per layer.

    Example:
        >>> weight_sparsity(magnitude_prune(model, 0.8))["sparsity"]
        0.8
    """
    per_layer, zeros, total = {}, 0, 0
    for name, module in prunable_layers(model):
        weight = module.weight.detach()
        layer_zeros = int((weight == 0).sum())
        per_layer[name] = layer_zeros / weight.numel()
        zeros, total = zeros + layer_zeros, total + weight.numel()
    return {
        "sparsity": zeros / total if total else 0.0,
        "zeros": zeros,
        "weights": total,
        "per_layer": per_layer,
    }


def magnitude_prune(model: nn.Module, sparsity: float, *, permanent: bool = True) -> nn.Module:
    """Zero the ``sparsity`` fraction of smallest-magnitude Linear / Conv2d weights, ranked globally.

    Args:
        model: Pruned in place (deep-copy it first to keep the original).
        sparsity: Fraction of those weights to zero, in [0, 1).
        permanent: Remove the masks (``prune.remove``) so only plain weights remain; False keeps them,
            for fine-tuning during which the pruned weights must stay zero (then call :func:`make_permanent`).

    Example:
        >>> pruned = magnitude_prune(copy.deepcopy(student), sparsity=0.7)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r} (0.5 zeroes half the weights)")
    layers = prunable_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    prune.global_unstructured(
        [(module, "weight") for _, module in layers], pruning_method=prune.L1Unstructured, amount=sparsity
    )
    return make_permanent(model) if permanent else model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight and remove the re-parametrisation (in place)."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def _keep_count(size: int, ratio: float) -> int:
    return max(1, size - math.floor(size * ratio))


def _ranked(layer: nn.Module, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` output units with the largest L1 weight norm, in their original order."""
    norms = layer.weight.detach().abs().flatten(1).sum(dim=1)  # [out]
    return norms.topk(keep).indices.sort().values


def _prune_chain(producer: nn.Module, norm: nn.Module | None, consumer: nn.Module, ratio: float) -> None:
    """Remove ``producer``'s weakest output units, with their BatchNorm channels and ``consumer``'s inputs."""
    keep = _ranked(producer, _keep_count(producer.weight.shape[0], ratio))
    slice_out(producer, keep)
    if norm is not None:
        slice_norm(norm, keep)
    slice_in(consumer, keep)


def _chains(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None, nn.Module]]:
    """(producer, norm, consumer) triples whose shared width can shrink without touching anything else."""
    if isinstance(model, MLP):
        linears = [block[0] for block in model.hidden] + [model.head]
        return [(linears[i], None, linears[i + 1]) for i in range(len(linears) - 1)]
    if isinstance(model, CifarResNet | WideCifarResNet):
        blocks = [m for m in model.modules() if isinstance(m, OptionABlock | OptionBBlock)]
        return [(block.conv1, block.bn1, block.conv2) for block in blocks]
    if isinstance(model, SmallCNN):
        blocks = [model.block1, model.block2, model.block3]
        consumers = [model.block2[0], model.block3[0], model.head]
        return [(block[0], block[1], consumer) for block, consumer in zip(blocks, consumers)]
    raise ConfigError(
        f"channel pruning knows the zoo's mlp, cnn and CIFAR ResNets, not {type(model).__name__}; "
        "use magnitude pruning (prune.method: magnitude) for other models"
    )


def channel_prune(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the prunable channels / hidden units removed from each layer.

    Args:
        model: A zoo ``mlp``, ``cnn`` or CIFAR ResNet (left unchanged).
        ratio: Fraction of units to remove from every prunable layer, in [0, 1); at least one unit stays.

    Returns:
        The smaller model: fewer parameters, FLOPs and bytes on disk.

    Example:
        >>> small = channel_prune(build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)), 0.5)
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"channel pruning ratio must be in [0, 1), got {ratio!r}")
    pruned = copy.deepcopy(model)
    for producer, norm, consumer in _chains(pruned):
        _prune_chain(producer, norm, consumer, ratio)
    return pruned


def prune_model(
    model: nn.Module, *, method: str, amount: float, loader: Any = None, max_batches: int = 16
) -> nn.Module:
    """A pruned copy: ``magnitude`` (``amount`` = sparsity), ``channel`` (``amount`` = ratio of units
    removed) or ``heads`` (attention heads of a BERT-family model, ranked by importance on up to
    ``max_batches`` labelled batches of ``loader``; :mod:`alambic.compress.head_pruning`)."""
    if method == "magnitude":
        return magnitude_prune(copy.deepcopy(model), amount)
    if method == "channel":
        return channel_prune(model, amount)
    if method == "heads":
        if loader is None:
            raise ConfigError("head pruning scores the heads on labelled batches: pass loader=")
        return prune_heads_by_importance(copy.deepcopy(model), loader, amount, max_batches=max_batches)
    raise ConfigError(f"prune method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")


def recover(
    pruned: nn.Module,
    unpruned: nn.Module,
    train_loader: Any,
    *,
    terms: Sequence[Any] | None = None,
    epochs: int = 1,
    keep_zeros: bool = True,
    **train: Any,
) -> nn.Module:
    """Distill the unpruned model into the pruned one to win back accuracy (:func:`alambic.distill`).

    Args:
        pruned: The pruned model; it is trained in place and returned.
        unpruned: The model before pruning: the teacher.
        train_loader: Training batches.
        terms: Distillation terms (default Hinton KD, see :func:`alambic.distill`).
        epochs: Passes over ``train_loader``.
        keep_zeros: Weights that are exactly zero (magnitude pruning) stay zero while training: they are
            masked with ``prune.custom_from_mask`` and the masks made permanent at the end.
        **train: Optimizer settings for :func:`alambic.distill`.

    Example:
        >>> recovered = recover(small, student, train_loader, epochs=2, optimizer="adamw", lr=1e-3)
    """
    if keep_zeros:
        for _, module in prunable_layers(pruned):
            mask = module.weight.detach() != 0
            if not bool(mask.all()):
                prune.custom_from_mask(module, "weight", mask)
    student = distill(
        copy.deepcopy(unpruned).eval(), pruned, train_loader, terms=terms, epochs=epochs, **train
    )
    return make_permanent(student)
