"""Feature distillation losses: compare intermediate activations (read through forward hooks).

Feature maps are ``[B, C, H, W]``; vectors ``[B, D]``. Where a method needs equal spatial sizes the
larger map is average-pooled to the smaller one; channel counts may differ unless a loss says so
(then the term's connector maps the student's channels to the teacher's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.registry import register_loss


def same_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``[B, C, H, W]`` maps to the other's spatial size."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"expected feature maps [B, C, H, W], got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    size_student, size_teacher = student.shape[-2:], teacher.shape[-2:]
    if size_student[0] > size_teacher[0]:
        student = F.adaptive_avg_pool2d(student, size_teacher)
    elif size_teacher[0] > size_student[0]:
        teacher = F.adaptive_avg_pool2d(teacher, size_student)
    return student, teacher


@register_loss(
    "fitnet", inputs="features", same_shape=True, paper="Romero et al. 2015, FitNets, arXiv:1412.6550"
)
def fitnet_loss(student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """FitNets hint loss: mean squared error between a student feature (through its connector) and a teacher one.

    ``loss = mean((connector(f_s) - f_t)^2)`` over all elements; shapes must match (the term's
    connector, a 1x1 conv + BN or a linear layer, is created automatically when they do not).

    Args:
        student: student feature ``[B, ...]`` after the connector.
        teacher: teacher feature, same shape.
        labels: unused.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"fitnet needs equal shapes, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; "
            "leave the term's connector on 'auto'"
        )
    return F.mse_loss(student.float(), teacher.detach().float())


def _attention_map(features: Tensor, power: float) -> Tensor:
    # |f|^p, as in the paper: a bare f^p flips the sign of negative activations for odd p and is NaN
    # for fractional p (the reference code's f.pow(p) only agrees with it for even p)
    return F.normalize(features.float().abs().pow(power).mean(1).flatten(1), dim=1)  # [B, H*W]


@register_loss(
    "at", inputs="features", paper="Zagoruyko & Komodakis 2017, Attention Transfer, arXiv:1612.03928"
)
def attention_transfer_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, power: float = 2.0
) -> Tensor:
    """Attention transfer: match L2-normalised spatial attention maps ``mean_c |f|^p``.

    ``a(f) = normalize(flatten(mean_c |f|^p))`` (``[B, H*W]``); ``loss = mean((a(f_s) - a(f_t))^2)``
    over batch and positions (the authors' code; the paper writes the norm of the difference). Channel
    counts may differ. The paper's weight is large (about 1000 with this mean).

    Args:
        student: student feature map ``[B, C_s, H, W]``.
        teacher: teacher feature map ``[B, C_t, H', W']`` (pooled to the smaller size).
        labels: unused.
        power: p >= 1 (paper: 2); below 1 the gradient of ``|f|^p`` is infinite at 0 (after a ReLU).
    """
    if not power >= 1:
        raise ValueError(f"at power must be >= 1, got {power}; the paper uses 2")
    student, teacher = same_spatial(student, teacher.detach())
    return (_attention_map(student, power) - _attention_map(teacher, power)).pow(2).mean()


@register_loss(
    "nst", inputs="features", paper="Huang & Wang 2017, Neuron Selectivity Transfer, arXiv:1707.01219"
)
def neuron_selectivity_loss(student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Neuron selectivity transfer: squared MMD between the channels' spatial activation patterns.

    Each channel's map is flattened and L2-normalised (``[B, C, HW]``); with the polynomial kernel
    ``k(x, y) = (x . y)^2``: ``loss = mean k(t, t) + mean k(s, s) - 2 mean k(s, t)``, per sample over
    channel pairs, averaged over the batch. Channel counts may differ.

    Args:
        student: student feature map ``[B, C_s, H, W]``.
        teacher: teacher feature map ``[B, C_t, H', W']``.
        labels: unused.
    """
    student, teacher = same_spatial(student, teacher.detach())
    s = F.normalize(student.float().flatten(2), dim=2)  # [B, C_s, HW]
    t = F.normalize(teacher.float().flatten(2), dim=2)  # [B, C_t, HW]

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.transpose(1, 2)).pow(2).mean()  # mean over batch and channel pairs

    return kernel(t, t) + kernel(s, s) - 2 * kernel(s, t)


@register_loss(
    "ab", inputs="features", same_shape=True, paper="Heo et al. 2019, Activation Boundaries, arXiv:1811.03233"
)
def activation_boundary_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, margin: float = 1.0
) -> Tensor:
    """Activation-boundary transfer: make each student neuron fire (> 0) exactly where the teacher's does.

    Compare *pre-activation* features (hook the layer before the ReLU). With ``s`` the student value
    through its connector and ``t`` the teacher's: ``loss = sum[(s + m)^2 * 1(s > -m, t <= 0)
    + (s - m)^2 * 1(s <= m, t > 0)] / B`` (a hinge with margin ``m`` on the wrong side of the boundary).

    Args:
        student: student pre-activations ``[B, ...]`` (through the connector).
        teacher: teacher pre-activations, same shape.
        labels: unused.
        margin: m > 0 (paper: 1).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"ab needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    s, t = student.float(), teacher.detach().float()
    teacher_on = t > 0
    wrongly_on = (s > -margin) & ~teacher_on  # [B, ...]
    wrongly_off = (s <= margin) & teacher_on
    penalty = (s + margin).pow(2) * wrongly_on + (s - margin).pow(2) * wrongly_off
    return penalty.sum() / s.shape[0]


def _flow_matrix(first: Tensor, second: Tensor) -> Tensor:
    """FSP matrix ``G = F1^T F2 / (H W)`` of two feature maps ``[B, C1, H, W]``, ``[B, C2, H', W']``."""
    first, second = same_spatial(first.float(), second.float())
    return (
        first.flatten(2) @ second.flatten(2).transpose(1, 2) / first.shape[-1] / first.shape[-2]
    )  # [B, C1, C2]


@register_loss(
    "fsp",
    inputs="features",
    multi_feature=True,
    paper="Yim et al. 2017, A Gift from Knowledge Distillation (FSP), CVPR 2017",
)
def flow_of_solution_loss(
    student: list[Tensor], teacher: list[Tensor], *, labels: Tensor | None = None
) -> Tensor:
    """Flow of solution procedure: match the Gram matrices between consecutive layers' feature maps.

    For features ``f_1 .. f_n`` on each side, ``G_i = f_i^T f_{i+1} / (H W)`` (``[B, C_i, C_{i+1}]``,
    the larger map average-pooled to the smaller); ``loss = sum_i mean((G_i^s - G_i^t)^2)`` (the paper
    sums over the matrix entries and weights the pairs equally: this is its loss divided by
    ``C_i C_{i+1}``, per sample). Channel counts must match pair by pair (as in the paper, whose
    student and teacher share stage widths).

    Args:
        student: ``n >= 2`` student feature maps, shallow to deep.
        teacher: ``n`` teacher feature maps with the same channel counts.
        labels: unused.
    """
    if len(student) < 2 or len(student) != len(teacher):
        raise ValueError(f"fsp needs n >= 2 features on each side, got {len(student)} and {len(teacher)}")
    loss = student[0].new_zeros((), dtype=torch.float32)
    for i in range(len(student) - 1):
        flow_student = _flow_matrix(student[i], student[i + 1])
        flow_teacher = _flow_matrix(teacher[i].detach(), teacher[i + 1].detach())
        if flow_student.shape != flow_teacher.shape:
            raise ValueError(
                f"fsp pair {i} has channels {tuple(flow_student.shape[1:])} (student) and "
                f"{tuple(flow_teacher.shape[1:])} (teacher); pick layers of equal widths"
            )
        loss = loss + (flow_student - flow_teacher).pow(2).mean()
    return loss


def _expected_negative_response(teacher: Tensor) -> Tensor:
    """OFD's margin per channel: ``E[x | x < 0]`` of a Gaussian fitted to each teacher channel.

    The paper reads mean and std from the BN layer before the ReLU; here they are measured on the batch
    (the same distribution, without needing the teacher's modules). ``[B, C, ...]`` -> ``[1, C, 1...]``.
    """
    values = teacher.transpose(0, 1).flatten(1)  # [C, N]
    mean, std = values.mean(1), values.std(1).clamp_min(1e-6)
    below = torch.special.ndtr(-mean / std)  # P(x < 0)
    density = torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(below > 1e-3, mean - std * density / below.clamp_min(1e-3), -3 * std)
    return margin.view(1, -1, *([1] * (teacher.dim() - 2)))


@register_loss(
    "ofd",
    inputs="features",
    same_shape=True,
    paper="Heo et al. 2019, A Comprehensive Overhaul of Feature Distillation, arXiv:1904.01866",
)
def overhaul_loss(student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Overhaul of feature distillation: partial L2 to the margin-ReLU'd teacher pre-activation.

    Compare pre-ReLU features (the student's through its connector, a 1x1 conv + BN). The teacher's
    negatives are raised to the channel margin ``m = E[t | t < 0]``: ``t' = max(t, m)``; then
    ``loss = sum((s - t')^2 * 1(s > t' or t' > 0)) / B``, i.e. no penalty where both are "off".
    The sum is large: the paper's weight is about 1e-3 to 1e-4.

    Args:
        student: student pre-activations ``[B, C, H, W]`` (or ``[B, D]``), through the connector.
        teacher: teacher pre-activations, same shape.
        labels: unused.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"ofd needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    s, t = student.float(), teacher.detach().float()
    target = torch.maximum(t, _expected_negative_response(t))
    penalised = (s > target) | (target > 0)
    return ((s - target).pow(2) * penalised).sum() / s.shape[0]
