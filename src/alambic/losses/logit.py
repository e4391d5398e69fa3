"""Logit distillation losses: compare the student's class scores with the teacher's (or the labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.registry import register_loss


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; Hinton et al. use 1 to 20 (try 4)")


def _rows_of(logits: Tensor) -> Tensor:
    """Logits ``[..., C]`` as float32 rows ``[N, C]`` (no new tensor when they already are)."""
    logits = logits.float()
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])


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
    log_p_student = F.log_softmax(_rows_of(student) / temperature, dim=-1)  # [N, C]
    log_p_teacher = F.log_softmax(_rows_of(teacher) / temperature, dim=-1)  # [N, C]
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
    return F.cross_entropy(
        _rows_of(student),
        labels if labels.dim() == 1 else labels.reshape(-1),
        label_smoothing=label_smoothing,
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


def _pearson(first: Tensor, second: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    first = first - first.mean(dim, keepdim=True)
    second = second - second.mean(dim, keepdim=True)
    return (first * second).sum(dim) / (first.norm(dim=dim) * second.norm(dim=dim) + eps)


@register_loss("dist", paper="Huang et al. 2022, DIST, arXiv:2205.10536")
def dist_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> Tensor:
    """DIST: match the teacher's predictions by Pearson correlation, across classes and across the batch.

    With ``P = softmax(z / T)`` of shape ``[B, C]``:
    ``loss = T^2 * (inter_weight * (1 - mean_b pearson(P_s[b,:], P_t[b,:]))
    + intra_weight * (1 - mean_c pearson(P_s[:,c], P_t[:,c])))``. Only relations count, not exact values.

    Args:
        student: student logits ``[B, C]``.
        teacher: teacher logits ``[B, C]``.
        labels: unused.
        temperature: T > 0 (the paper uses 1 on CIFAR and ImageNet).
        inter_weight: beta, weight of the per-sample (inter-class) relation.
        intra_weight: gamma, weight of the per-class (intra-class) relation.
    """
    _check_temperature(temperature)
    _check_same_shape(student, teacher)
    p_student = F.softmax(student.float() / temperature, dim=-1)  # [B, C]
    p_teacher = F.softmax(teacher.detach().float() / temperature, dim=-1)  # [B, C]
    inter = 1.0 - _pearson(p_student, p_teacher, dim=1).mean()
    intra = 1.0 - _pearson(p_student, p_teacher, dim=0).mean()
    return temperature**2 * (inter_weight * inter + intra_weight * intra)


def _standardize(logits: Tensor) -> Tensor:
    mean = logits.mean(dim=-1, keepdim=True)  # [B, 1]
    std = logits.std(dim=-1, keepdim=True)  # [B, 1]
    return (logits - mean) / (std + 1e-7)


@register_loss("kd_logit_std", paper="Sun et al. 2024, Logit Standardization in KD, arXiv:2403.01427")
def kd_logit_std_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, temperature: float = 2.0
) -> Tensor:
    """KD on z-scored logits: each sample's logits standardised (mean 0, std 1) before softening.

    ``loss = T^2 * KL(softmax(z(t) / T) || softmax(z(s) / T))`` with ``z(x) = (x - mean(x)) / std(x)``
    per sample, so the student matches the teacher's logit *relations* rather than its magnitude.

    Args:
        student: student logits ``[B, C]``.
        teacher: teacher logits ``[B, C]``.
        labels: unused.
        temperature: base temperature T > 0 (the paper's CIFAR setting uses 2).
    """
    _check_temperature(temperature)
    _check_same_shape(student, teacher)
    return kd_loss(
        _standardize(student.float()), _standardize(teacher.detach().float()), temperature=temperature
    )


@register_loss(
    "tf_kd",
    needs_teacher=False,
    needs_labels=True,
    paper="Yuan et al. 2020, Teacher-free KD, arXiv:1909.11723",
)
def teacher_free_kd_loss(
    student: Tensor,
    teacher: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    correct_probability: float = 0.9,
    temperature: float = 20.0,
) -> Tensor:
    """Teacher-free KD (Tf-KD_reg): distill from a hand-made "virtual teacher" built from the labels.

    The virtual teacher puts ``a = correct_probability`` on the true class and ``(1 - a) / (C - 1)`` on
    every other class; it is softened as ``q_T = softmax(log q / T)`` and
    ``loss = T^2 * KL(q_T || softmax(student / T))``, averaged per sample. (The paper does not say how
    ``q`` is softened; the authors' code takes ``softmax(q / T)`` of the probabilities themselves and
    leaves the student unsoftened, and so transfers a near-uniform target at T = 20.)

    Args:
        student: student logits ``[B, C]``.
        teacher: unused (no teacher needed).
        labels: class indices ``[B]``.
        correct_probability: a in (1/C, 1).
        temperature: T > 0 (the paper uses 20 on CIFAR-100).
    """
    if labels is None:
        raise ValueError("the 'tf_kd' loss needs labels; the batch has none")
    num_classes = student.shape[-1]
    if not 1.0 / num_classes < correct_probability < 1.0:
        raise ValueError(f"correct_probability must be in (1/{num_classes}, 1), got {correct_probability}")
    virtual = torch.full_like(student.float(), (1.0 - correct_probability) / (num_classes - 1))  # [B, C]
    virtual.scatter_(1, labels.reshape(-1, 1).long(), correct_probability)
    return kd_loss(student, virtual.log(), temperature=temperature)


@register_loss(
    "dkd", needs_labels=True, needs_epoch=True, paper="Zhao et al. 2022, Decoupled KD, arXiv:2203.08679"
)
def dkd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    epoch: float | None = None,
    target_weight: float = 1.0,
    non_target_weight: float = 8.0,
    temperature: float = 4.0,
    warmup_epochs: float = 20.0,
) -> Tensor:
    """Decoupled KD: target-class KD (TCKD) and non-target-class KD (NCKD) weighted separately.

    With ``p = softmax(z / T)`` and ``b = [p_target, 1 - p_target]``:
    ``TCKD = T^2 * KL(b_t || b_s)``; ``NCKD = T^2 * KL(p̂_t || p̂_s)`` over the non-target classes
    (renormalised); ``loss = min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD)``.

    Args:
        student: student logits ``[B, C]``.
        teacher: teacher logits ``[B, C]``.
        labels: class indices ``[B]``.
        epoch: the current (1-based) epoch, passed by the loop for the linear warm-up.
        target_weight: alpha (paper: 1).
        non_target_weight: beta (paper: 8 on CIFAR-100 ResNet pairs, 0.5-2 on ImageNet).
        temperature: T > 0 (paper: 4).
        warmup_epochs: epochs over which the loss ramps up linearly (paper: 20); 0 disables it.
    """
    _check_temperature(temperature)
    _check_same_shape(student, teacher)
    if labels is None:
        raise ValueError("the 'dkd' loss needs labels; the batch has none")
    target = F.one_hot(labels.reshape(-1).long(), student.shape[-1]).bool()  # [B, C]
    p_student = F.softmax(student.float() / temperature, dim=-1)  # [B, C]
    p_teacher = F.softmax(teacher.detach().float() / temperature, dim=-1)  # [B, C]
    binary_student = torch.stack(
        [(p_student * target).sum(-1), (p_student * ~target).sum(-1)], dim=-1
    )  # [B, 2]
    binary_teacher = torch.stack(
        [(p_teacher * target).sum(-1), (p_teacher * ~target).sum(-1)], dim=-1
    )  # [B, 2]
    tckd = F.kl_div(binary_student.clamp_min(1e-12).log(), binary_teacher, reduction="batchmean")
    # non-target distributions: mask the target logit out before the softmax
    masked_student = (student.float() / temperature).masked_fill(target, float("-inf"))  # [B, C]
    masked_teacher = (teacher.detach().float() / temperature).masked_fill(target, float("-inf"))  # [B, C]
    log_q_student = F.log_softmax(masked_student, dim=-1).masked_fill(target, 0.0)
    log_q_teacher = F.log_softmax(masked_teacher, dim=-1).masked_fill(target, 0.0)
    nckd = (log_q_teacher.exp() * (log_q_teacher - log_q_student)).sum(-1).mean()
    ramp = 1.0 if (warmup_epochs <= 0 or epoch is None) else min(epoch / warmup_epochs, 1.0)
    return ramp * temperature**2 * (target_weight * tckd + non_target_weight * nckd)
