"""Quantization-aware training with the teacher as the signal (QAT + KD).

Every Linear and Conv2d of the student is wrapped so that, while it trains, its input activation and its
weights pass through int8 fake quantization (quantize, round, dequantize): the forward pass sees the
rounding errors that int8 inference will make, and the backward pass treats the rounding as the identity
inside the representable range (the straight-through estimator, Bengio et al. 2013). Gradients come from
the usual terms, here Hinton KD from the float teacher plus cross-entropy, as in the QAT + KD recipes of
Intel's and NVIDIA's toolkits and of Apprentice (Mishra & Marr 2018, https://arxiv.org/abs/1711.05852).

The scheme mirrors what :func:`alambic.compress.quantize.quantize_onnx_static` produces: weights symmetric int8
per output channel, activations affine uint8 per tensor with ranges tracked by an exponential moving
average of their min and max. It is deliberately small (PyTorch's core ``fake_quantize_per_*_affine``
operators, which carry the straight-through gradient) rather than a dependency: PyTorch's eager
``torch.ao.quantization`` QAT is deprecated, and torchao's QAT targets Linear layers of language models.
BatchNorm is not folded into the convolution during training (onnxruntime folds it before quantizing),
so the simulated weights differ slightly from the deployed ones.

The KD temperature is exposed: IntelLabs Distiller notes that a high temperature can hurt low-bit
students, so the default here is 2 rather than the usual 4.

Example:
    >>> qat_student = qat_distill(teacher, student, train_loader, temperature=2.0, epochs=1, lr=1e-3)
    >>> export_onnx(qat_student, images[:2], "student-qat.onnx")  # then quantize_onnx_static
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.core.api import as_terms, distill
from alambic.errors import ConfigError


class ActivationFakeQuant(nn.Module):
    """Affine uint8 fake quantization of a tensor, with its range tracked by a moving average."""

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)  # the range holds 0 exactly
                if not bool(self.initialised):
                    self.low.copy_(low), self.high.copy_(high), self.initialised.fill_(True)
                else:
                    self.low.lerp_(low, self.momentum), self.high.lerp_(high, self.momentum)
        if not bool(self.initialised):
            return x
        scale = float((self.high - self.low).clamp(min=1e-8)) / 255.0
        zero_point = int(round(-float(self.low) / scale))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def fake_quantize_weight(weight: Tensor) -> Tensor:
    """Symmetric int8 fake quantization per output channel (scale = max |w| / 127 of each channel)."""
    scale = weight.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -127, 127)


class FakeQuantWrapper(nn.Module):
    """A Linear or Conv2d whose input and weights are fake-quantized to int8 while it runs."""

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.layer = layer
        self.input_quant = ActivationFakeQuant()

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quant(x)
        weight = fake_quantize_weight(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


def prepare_qat(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Linear and Conv2d wrapped in :class:`FakeQuantWrapper`.

    Example:
        >>> qat_model = prepare_qat(student)
    """
    prepared = copy.deepcopy(model)
    targets = [name for name, module in prepared.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)]
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to quantize")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = prepared.get_submodule(parent_name) if parent_name else prepared
        setattr(parent, child, FakeQuantWrapper(getattr(parent, child)))
    return prepared


def strip_qat(model: nn.Module) -> nn.Module:
    """The float model again: every wrapper replaced by its layer (same module paths and state dict keys)."""
    stripped = copy.deepcopy(model)
    wrappers = [name for name, module in stripped.named_modules() if isinstance(module, FakeQuantWrapper)]
    for name in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = stripped.get_submodule(parent_name) if parent_name else stripped
        setattr(parent, child, getattr(parent, child).layer)
    return stripped


def qat_terms(temperature: float = 2.0, kd_weight: float = 0.9) -> list[dict]:
    """The QAT + KD terms: ``ce * (1 - kd_weight) + kd(temperature) * kd_weight``."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ConfigError(f"kd_weight must be in [0, 1], got {kd_weight!r}")

    terms = [{"loss": "kd", "weight": kd_weight, "params": {"temperature": temperature}}]
    if kd_weight < 1.0:
        terms.insert(0, {"loss": "ce", "weight": 1.0 - kd_weight})
    return [term.model_dump() for term in as_terms(terms)]  # validates the temperature


def qat_distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train_loader: Any,
    *,
    temperature: float = 2.0,
    kd_weight: float = 0.9,
    epochs: int = 1,
    **train: Any,
) -> nn.Module:
    """Quantization-aware training of ``student`` distilled from ``teacher``; returns the float model.

    Args:
        teacher: The float teacher (the unquantized student, or the original teacher); None trains
            on labels alone (``kd_weight`` is then ignored).
        student: The model to fine-tune with int8 fake quantization (left unchanged).
        train_loader: Training batches.
        temperature: KD temperature (> 0); low values suit low-bit students.
        kd_weight: Weight of the KD term; cross-entropy gets ``1 - kd_weight``.
        epochs: Passes over ``train_loader``.
        **train: Optimizer settings for :func:`alambic.distill` (``optimizer``, ``lr``, ...).

    Returns:
        The trained student with plain Linear / Conv2d layers, ready for export and static int8.

    Example:
        >>> qat_student = qat_distill(teacher, student, train_loader, temperature=2.0, lr=1e-3)
    """
    terms = qat_terms(temperature, kd_weight) if teacher is not None else [{"loss": "ce"}]
    trained = distill(teacher, prepare_qat(student), train_loader, terms=terms, epochs=epochs, **train)
    return strip_qat(trained)
