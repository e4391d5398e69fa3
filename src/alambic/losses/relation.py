"""Relation distillation losses: match how samples of a batch relate to each other, not the features.

Inputs are any ``[B, ...]`` features (flattened to ``[B, D]``); student and teacher widths may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.registry import register_loss


def _flat(features: Tensor) -> Tensor:
    return features.float().flatten(1)  # [B, D]


@register_loss("sp", inputs="features", paper="Tung & Mori 2019, Similarity-Preserving KD, arXiv:1907.09682")
def similarity_preserving_loss(student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Similarity-preserving KD: match the row-normalised batch similarity matrices.

    ``G = normalize_rows(f f^T)`` (``[B, B]``); ``loss = ||G_t - G_s||_F^2 / B^2``.

    Args:
        student: student features ``[B, ...]``.
        teacher: teacher features ``[B, ...]``.
        labels: unused.
    """
    s, t = _flat(student), _flat(teacher.detach())
    gram_student = F.normalize(s @ s.T, dim=1)  # [B, B]
    gram_teacher = F.normalize(t @ t.T, dim=1)  # [B, B]
    return (gram_teacher - gram_student).pow(2).sum() / s.shape[0] ** 2


@register_loss("pkt", inputs="features", paper="Passalis & Tefas 2018, Probabilistic KT, arXiv:1803.10837")
def probabilistic_transfer_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, eps: float = 1e-7
) -> Tensor:
    """Probabilistic knowledge transfer: match conditional distributions built from cosine similarities.

    ``K = (cos(f_i, f_j) + 1) / 2``, rows normalised to sum 1 (``P``); ``loss = mean P_t log(P_t / P_s)``.

    Args:
        student: student features ``[B, ...]``.
        teacher: teacher features ``[B, ...]``.
        labels: unused.
        eps: numerical floor.
    """

    def conditional(features: Tensor) -> Tensor:
        unit = F.normalize(_flat(features), dim=1)
        similarity = (unit @ unit.T + 1.0) / 2.0  # [B, B] in [0, 1]
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_student, p_teacher = conditional(student), conditional(teacher.detach())
    return torch.mean(p_teacher * torch.log((p_teacher + eps) / (p_student + eps)))


def _pairwise_distances(features: Tensor) -> Tensor:
    distances = torch.cdist(features, features)  # [B, B]
    mean = distances[distances > 0].mean()
    return distances / mean


def _angles(features: Tensor) -> Tensor:
    differences = F.normalize(features.unsqueeze(0) - features.unsqueeze(1), dim=2)  # [B, B, D]
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()  # [B*B*B]


@register_loss("rkd", inputs="features", paper="Park et al. 2019, Relational KD, arXiv:1904.05068")
def relational_kd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Relational KD: match normalised pairwise distances and triplet angles (smooth L1, Huber).

    ``psi_D(i, j) = ||f_i - f_j|| / mean distance``; ``psi_A(i, j, k) = <e_ij, e_kj>`` with unit
    difference vectors; ``loss = w_D * huber(psi_D^s, psi_D^t) + w_A * huber(psi_A^s, psi_A^t)``.

    Args:
        student: student features ``[B, ...]`` (B >= 2).
        teacher: teacher features ``[B, ...]``.
        labels: unused.
        distance_weight: w_D (paper: 25).
        angle_weight: w_A (paper: 50).
    """
    s, t = _flat(student), _flat(teacher.detach())
    if s.shape[0] < 2:
        raise ValueError("rkd compares samples with each other: it needs a batch of at least 2")
    distance = F.smooth_l1_loss(_pairwise_distances(s), _pairwise_distances(t))
    angle = F.smooth_l1_loss(_angles(s), _angles(t))
    return distance_weight * distance + angle_weight * angle


@register_loss("cc", inputs="features", paper="Peng et al. 2019, Correlation Congruence, arXiv:1904.01802")
def correlation_congruence_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, gamma: float = 0.4
) -> Tensor:
    """Correlation congruence: match the batch's sample-to-sample correlation under a Gaussian RBF kernel.

    On L2-normalised features, ``C[i, j] = exp(-gamma * ||f_i - f_j||^2)`` (``[B, B]``);
    ``loss = ||C_t - C_s||_F^2 / B^2``. The paper approximates the kernel by a Taylor series; this
    uses the exact kernel.

    Args:
        student: student features ``[B, ...]``.
        teacher: teacher features ``[B, ...]``.
        labels: unused.
        gamma: kernel width (> 0).
    """

    def correlation(features: Tensor) -> Tensor:
        unit = F.normalize(_flat(features), dim=1)
        return torch.exp(-gamma * torch.cdist(unit, unit).pow(2))  # [B, B]

    difference = correlation(teacher.detach()) - correlation(student)
    return difference.pow(2).sum() / student.shape[0] ** 2
