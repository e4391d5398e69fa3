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

    ``K = (cos(f_i, f_j) + 1) / 2`` (``[B, B]``), rows normalised to sum 1 (``P``);
    ``loss = mean_{i,j} P_t log((P_t + eps) / (P_s + eps))`` over the ``B^2`` entries; as in the
    authors' code, ``K`` keeps its diagonal (``K_ii = 1``) and the KL is averaged, not summed.

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


def _distances_and_angles(features: Tensor) -> tuple[Tensor, Tensor]:
    """RKD's normalised distances ``[B, B]`` and angles ``[B, B, B]`` of ``[B, D]`` features.

    The distances come from the explicit differences, so the diagonal is exactly 0 at any batch size
    (``torch.cdist`` switches to a matrix-product path above 25 rows and leaves it at 1e-3 to 1e-2);
    their normalising mean runs over the off-diagonal pairs ``i != j``, chosen by index, never by
    value (a value test ``d > 0`` keeps cdist's non-zero diagonal and drops coincident samples).
    ``vector_norm``'s gradient at a zero difference is 0, so duplicates give no NaN.
    """
    differences = features.unsqueeze(0) - features.unsqueeze(1)  # [B, B, D]: f_j - f_i, 0 when i == j
    distances = torch.linalg.vector_norm(differences, dim=2)  # [B, B]
    off_diagonal = ~torch.eye(features.shape[0], dtype=torch.bool, device=features.device)  # [B, B]
    # a floor keeps a batch of identical samples finite (all its distances are then 0 anyway)
    mean = distances[off_diagonal].mean().clamp_min(1e-12)
    unit = F.normalize(differences, dim=2)  # [B, B, D]; a zero difference stays 0
    angles = torch.bmm(unit, unit.transpose(1, 2))  # [B, B, B]: <e(f_j - f_i), e(f_k - f_i)>
    return distances / mean, angles


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

    ``psi_D(i, j) = ||f_i - f_j|| / mu`` with ``mu`` the mean of ``||f_i - f_j||`` over the pairs
    ``i != j``; ``psi_A(i, j, k) = <e_ji, e_ki>`` with ``e_ji = (f_j - f_i) / ||f_j - f_i||`` (0 when
    ``f_j = f_i``). ``loss = w_D * mean_{i,j} huber(psi_D^s - psi_D^t) + w_A * mean_{i,j,k}
    huber(psi_A^s - psi_A^t)``, ``huber(x) = x^2 / 2`` for ``|x| < 1`` else ``|x| - 1/2``. As in
    the authors' code (and RepDistiller, whose weights 25 and 50 these are), the means run over all
    ``B^2`` pairs and ``B^3`` triplets; those with a repeated index are equal on both sides.

    Args:
        student: student features ``[B, ...]`` (B >= 2).
        teacher: teacher features ``[B, ...]``.
        labels: unused.
        distance_weight: w_D (RepDistiller: 25).
        angle_weight: w_A (RepDistiller: 50).
    """
    s, t = _flat(student), _flat(teacher.detach())
    if s.shape[0] < 2:
        raise ValueError("rkd compares samples with each other: it needs a batch of at least 2")
    distances_student, angles_student = _distances_and_angles(s)
    distances_teacher, angles_teacher = _distances_and_angles(t)
    distance = F.smooth_l1_loss(distances_student, distances_teacher)
    angle = F.smooth_l1_loss(angles_student, angles_teacher)
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
        unit = F.normalize(_flat(features), dim=1)  # [B, D]
        # unit vectors: ||u - v||^2 = 2 - 2 u.v, smooth everywhere (no square root to differentiate)
        squared = (2.0 - 2.0 * unit @ unit.T).clamp_min(0.0)  # [B, B]
        diagonal = torch.eye(unit.shape[0], dtype=torch.bool, device=unit.device)
        return torch.exp(-gamma * squared.masked_fill(diagonal, 0.0))  # [B, B]; exactly 1 on the diagonal

    difference = correlation(teacher.detach()) - correlation(student)
    return difference.pow(2).sum() / student.shape[0] ** 2
