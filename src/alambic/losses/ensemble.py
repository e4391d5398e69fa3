"""Multi-teacher soft targets: the weighted average of several teachers' softened predictions.

Pure functions over tensors; :class:`alambic.strategies.EnsembleModel` uses the same average for its
output, so an ensemble teacher's targets and this loss's agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ConfigError
from alambic.losses.registry import register_loss

WEIGHTINGS = ("fixed", "confidence", "entropy", "correct")


def ensemble_probabilities(
    member_logits: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "fixed",
    weights: Sequence[float] | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """The weighted average of the teachers' softened probabilities, ``[B, C]``.

    ``p_k = softmax(z_k / T)``; ``p = sum_k w_k p_k`` with, per sample,

    - ``fixed``: ``w_k`` from ``weights`` (normalised to sum 1; equal when None),
    - ``confidence``: ``w_k = max_c p_k[c] / sum_j max_c p_j[c]`` (the surer teacher counts more),
    - ``entropy``: ``w_k = softmax_k(-H(p_k))`` (lower entropy, more weight),
    - ``correct``: ``w_k = 1[argmax p_k = y] / #correct``; samples no teacher gets right fall back to
      the fixed weights (needs ``labels``).

    Args:
        member_logits: every teacher's logits ``[B, K, C]``.
        temperature: softening temperature T > 0.
        weighting: one of ``fixed``, ``confidence``, ``entropy``, ``correct``.
        weights: ``K`` non-negative fixed weights (``fixed``, and the fallback of ``correct``).
        labels: ``[B]`` class indices, for ``correct``.

    Example:
        >>> p = ensemble_probabilities(torch.randn(8, 3, 10), temperature=4.0, weighting="confidence")
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown ensemble weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    num_members = member_logits.shape[1]
    probabilities = F.softmax(member_logits.float() / temperature, dim=-1)  # [B, K, C]
    fixed = fixed_weights(weights, num_members).to(probabilities.device)  # [K]
    if weighting == "fixed":
        member_weights = fixed.expand(probabilities.shape[0], num_members)  # [B, K]
    elif weighting == "confidence":
        confidence = probabilities.max(dim=-1).values  # [B, K]
        member_weights = confidence / confidence.sum(dim=1, keepdim=True)
    elif weighting == "entropy":
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)  # [B, K]
        member_weights = F.softmax(-entropy, dim=1)
    else:
        if labels is None:
            raise ConfigError("ensemble weighting 'correct' needs the labels; use the ensemble_kd loss")
        correct = (probabilities.argmax(dim=-1) == labels.view(-1, 1)).float()  # [B, K]
        count = correct.sum(dim=1, keepdim=True)  # [B, 1]
        member_weights = torch.where(count > 0, correct / count.clamp_min(1.0), fixed.expand_as(correct))
    return (member_weights.unsqueeze(-1) * probabilities).sum(dim=1)  # [B, C]


def fixed_weights(weights: Sequence[float] | None, num_members: int) -> Tensor:
    """``weights`` as a tensor summing to 1 (equal weights when None); one clear error when invalid."""
    if weights is None:
        return torch.full((num_members,), 1.0 / num_members)
    if len(weights) != num_members or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"ensemble weights must be {num_members} non-negative numbers with a positive sum, got {list(weights)}"
        )
    tensor = torch.tensor([float(w) for w in weights])
    return tensor / tensor.sum()


@register_loss(
    "ensemble_kd",
    inputs="ensemble",  # student logits [B, C] against the members' logits [B, K, C]
    paper="Hinton et al. 2015 (ensembles); You et al. 2017, KDD, doi:10.1145/3097983.3098135",
)
def ensemble_kd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    temperature: float = 4.0,
    weighting: str = "fixed",
    weights: list[float] | None = None,
) -> Tensor:
    """KD from several teachers: ``T^2 * KL(p_ens || softmax(s / T))`` with ``p_ens`` from :func:`ensemble_probabilities`.

    Read the teachers from an :class:`alambic.strategies.EnsembleModel` with ``teacher: members``; unlike the ensemble's own
    ``logits``, this loss sees the labels, so it can weight teachers by per-sample correctness.

    Args:
        student: student logits ``[B, C]``.
        teacher: the members' logits ``[B, K, C]`` (a single teacher's ``[B, C]`` counts as ``K = 1``).
        labels: ``[B]`` class indices (for ``weighting: correct``).
        temperature: softening temperature T > 0.
        weighting: ``fixed``, ``confidence``, ``entropy`` or ``correct``.
        weights: fixed weights of the ``K`` teachers (equal when None).
    """
    if teacher.dim() == 2:
        teacher = teacher.unsqueeze(1)  # one teacher [B, C] is an ensemble of one
    if teacher.dim() != 3 or teacher.shape[0] != student.shape[0] or teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"ensemble_kd compares student logits [B, C] with the members' logits [B, K, C] (teacher: members); "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    target = ensemble_probabilities(
        teacher.detach(), temperature=temperature, weighting=weighting, weights=weights, labels=labels
    )  # [B, C]
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)  # [B, C]
    return F.kl_div(log_p_student, target, reduction="batchmean") * temperature**2
