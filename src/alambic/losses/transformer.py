"""Transformer losses: hidden states, attention maps and value relations, over real (unpadded) tokens.

Hidden states are ``[B, T, D]``; attention maps ``[B, H, T, T]`` (each query row a distribution over
keys, as Hugging Face returns with ``output_attentions``); value projections ``[B, T, D]``. ``mask``
is the batch's ``attention_mask`` ``[B, T]`` (1 = real token), passed by the loop: padded tokens count
neither as positions nor as keys. Name the layers on each side as ``hidden_states.K``,
``attentions.K`` or a module path (``bert.encoder.layer.5.attention.self.value``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.registry import register_loss


def _token_weights(value: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, T]`` float weights of real tokens (all ones without a mask)."""
    if mask is None:
        return value.new_ones(value.shape[:2], dtype=torch.float32)
    if tuple(mask.shape) != tuple(value.shape[:2]):
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not fit values {tuple(value.shape)}")
    return mask.float()


def _check_same(student: Tensor, teacher: Tensor, loss: str, fix: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss} needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}; {fix}"
        )


@register_loss(
    "hidden_mse",
    inputs="hidden",
    same_shape=True,
    paper="Jiao et al. 2020, TinyBERT, arXiv:1909.10351 (hidden and embedding layers)",
)
def hidden_mse_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """Hidden-state MSE over real tokens, the student's through a learned projection (TinyBERT).

    ``loss = sum_{b,t} m_bt ||W h_s - h_t||^2 / (D sum m)``. With ``hidden_states.0`` on both sides it
    is TinyBERT's embedding-layer loss. The projection is the term's automatic linear connector.

    Args:
        student: ``[B, T, D]`` (through the connector), or ``[B, D]`` sentence embeddings; teacher: same.
        labels: unused. mask: ``[B, T]`` attention mask (token values only).
    """
    _check_same(student, teacher, "hidden_mse", "leave the term's connector on 'auto'")
    squared = (student.float() - teacher.detach().float()).pow(2).mean(-1)  # [B, T] (or [B] for embeddings)
    if squared.dim() == 1:
        return squared.mean()
    weights = _token_weights(student, mask)  # [B, T]
    return (squared * weights).sum() / weights.sum().clamp_min(1)


@register_loss(
    "hidden_cosine",
    inputs="hidden",
    same_shape=True,
    paper="Sanh et al. 2019, DistilBERT, arXiv:1910.01108 (cosine embedding loss)",
)
def hidden_cosine_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """DistilBERT's cosine loss: ``1 - cos(h_s, h_t)`` per real token, averaged; aligns directions, not norms.

    Args:
        student: ``[B, T, D]`` (or ``[B, D]`` embeddings); teacher: same shape.
        labels: unused. mask: ``[B, T]`` attention mask.
    """
    _check_same(student, teacher, "hidden_cosine", "leave the term's connector on 'auto'")
    distance = 1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)  # [B, T] or [B]
    if distance.dim() == 1:
        return distance.mean()
    weights = _token_weights(student, mask)
    return (distance * weights).sum() / weights.sum().clamp_min(1)


def _check_attention(student: Tensor, teacher: Tensor, loss: str) -> None:
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"{loss} compares attention maps [B, H, T, T] with one head count, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}; derive the student with the teacher's number of heads"
        )


@register_loss("attention_mse", inputs="attention", paper="Jiao et al. 2020, TinyBERT, arXiv:1909.10351")
def attention_mse_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """TinyBERT's attention loss: MSE between attention maps, per head, over real query and key tokens.

    ``loss = sum_{b,h,i,j} m_bi m_bj (A_s - A_t)^2 / (H sum_b (sum_i m_bi)^2)``. TinyBERT compares the
    scores before the softmax; Hugging Face returns the probabilities, which are compared here.

    Args:
        student: ``[B, H, T, T]``; teacher: same shape (same number of heads).
        labels: unused. mask: ``[B, T]`` attention mask.
    """
    _check_attention(student, teacher, "attention_mse")
    weights = _token_weights(student[:, 0, :, 0], mask)  # [B, T]
    pair = weights[:, None, :, None] * weights[:, None, None, :]  # [B, 1, T, T]
    squared = (student.float() - teacher.detach().float()).pow(2) * pair
    return squared.sum() / (pair.sum() * student.shape[1]).clamp_min(1)


def _row_kl(teacher_probs: Tensor, student_probs: Tensor, weights: Tensor) -> Tensor:
    """Mean over real query rows (and heads) of ``KL(teacher row || student row)``; ``[B, H, T, T]`` inputs."""
    kl = (teacher_probs * (teacher_probs.clamp_min(1e-12).log() - student_probs.clamp_min(1e-12).log())).sum(
        -1
    )
    return (kl * weights[:, None, :]).sum() / (weights.sum() * kl.shape[1]).clamp_min(1)


@register_loss("attention_kl", inputs="attention", paper="Wang et al. 2020, MiniLM, arXiv:2002.10957")
def attention_kl_loss(
    student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """MiniLM's self-attention distribution transfer: KL(A_t || A_s) per head and real query row, averaged.

    Args:
        student: ``[B, H, T, T]`` attention probabilities (last layer in MiniLM); teacher: same shape.
        labels: unused. mask: ``[B, T]`` attention mask (padded keys carry no probability already).
    """
    _check_attention(student, teacher, "attention_kl")
    weights = _token_weights(student[:, 0, :, 0], mask)
    return _row_kl(teacher.detach().float(), student.float(), weights)


def _value_relation(values: Tensor, num_heads: int, mask: Tensor | None) -> Tensor:
    """``softmax(V_h V_h^T / sqrt(d_h))`` per head over real keys: ``[B, T, D]`` -> ``[B, H, T, T]``."""
    batch, length, width = values.shape
    if width % num_heads:
        raise ValueError(f"value width {width} is not divisible by num_heads={num_heads}")
    heads = values.float().view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # [B, H, T, d]
    scores = heads @ heads.transpose(-1, -2) / (width // num_heads) ** 0.5  # [B, H, T, T]
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


@register_loss("value_relation_kl", inputs="values", paper="Wang et al. 2020, MiniLM, arXiv:2002.10957")
def value_relation_kl_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    num_heads: int = 12,
) -> Tensor:
    """MiniLM's value-relation transfer: KL between per-head ``softmax(V V^T / sqrt(d))`` of teacher and student.

    Hook the value projections (``...attention.self.value`` in BERT); widths may differ, the relation
    matrices ``[B, H, T, T]`` do not. Both sides are split into ``num_heads`` heads.

    Args:
        student: student values ``[B, T, D_s]``; teacher: teacher values ``[B, T, D_t]``.
        labels: unused. mask: ``[B, T]`` attention mask. num_heads: heads of both models.
    """
    if student.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"value_relation_kl compares values [B, T, D] of one sequence, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    weights = _token_weights(student, mask)
    relation_teacher = _value_relation(teacher.detach(), num_heads, mask)
    return _row_kl(relation_teacher, _value_relation(student, num_heads, mask), weights)
