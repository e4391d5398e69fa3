"""Logit distillation losses: compare the student's class scores with the teacher's (or the labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.registry import register_loss


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; Hinton et al. use 1 to 20 (try 4)")


def _check_same_shape(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
            "teacher and student must predict the same number of classes"
        )


@register_loss("kd", paper="Hinton, Vinyals & Dean 2015, arXiv:1503.02531")
def kd_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, temperature: float = 4.0
) -> Tensor:
    """Soft-target KD: KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over samples.

    ``loss = T^2 / B * sum_b sum_c p_t[b,c] * (log p_t[b,c] - log p_s[b,c])`` with ``p = softmax(z / T)``.
    The ``T^2`` keeps the gradient's scale independent of T (its gradient w.r.t. the student logits is
    ``T * (p_s - p_t) / B``, i.e. ``(p_s - p_t) / T`` before the T^2 scale). Averaging is per *sample*
    ("batchmean"), not per element: KLDiv's "mean" divides by the number of classes too (a known trap).

    Args:
        student: student logits ``[B, C]`` (or ``[..., C]``; every leading position counts as a sample).
        teacher: teacher logits, same shape.
        labels: unused.
        temperature: softening temperature T > 0.
    """
    _check_temperature(temperature)
    _check_same_shape(student, teacher)
    teacher = teacher.detach()  # a target: no gradient into the teacher, even when it is still training
    num_classes = student.shape[-1]
    log_p_student = F.log_softmax(student.float().reshape(-1, num_classes) / temperature, dim=-1)  # [N, C]
    log_p_teacher = F.log_softmax(teacher.float().reshape(-1, num_classes) / temperature, dim=-1)  # [N, C]
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_loss("ce", needs_teacher=False, needs_labels=True, paper="cross-entropy on hard labels")
def cross_entropy_loss(
    student: Tensor,
    teacher: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of the student's logits with the hard labels (optional label smoothing).

    ``loss = -1/N * sum_n log softmax(student)[n, y_n]``; labels equal to -100 are ignored.

    Args:
        student: student logits ``[B, C]`` (or ``[..., C]`` with labels ``[...]``).
        teacher: unused.
        labels: class indices ``[B]``.
        label_smoothing: in [0, 1); Szegedy et al. 2016.
    """
    if labels is None:
        raise ValueError("the 'ce' loss needs labels; the batch has none")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    num_classes = student.shape[-1]
    return F.cross_entropy(
        student.float().reshape(-1, num_classes), labels.reshape(-1), label_smoothing=label_smoothing
    )


@register_loss("logit_mse", paper="Ba & Caruana 2014, arXiv:1312.6184 (regressing logits)")
def logit_mse_loss(student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Mean squared error between student and teacher logits, averaged over all elements.

    ``loss = 1/(B*C) * sum (z_s - z_t)^2``.

    Args:
        student: student logits ``[B, C]``.
        teacher: teacher logits ``[B, C]``.
        labels: unused.
    """
    _check_same_shape(student, teacher)
    return torch.mean((student.float() - teacher.detach().float()) ** 2)
