"""Token-level losses for causal language models: divergences between next-token distributions.

Logits are ``[B, T, V]``; ``labels`` are ``[B, T]`` token ids in the Hugging Face convention (aligned
with the inputs, ``-100`` on padding and prompt tokens). With ``shift_labels`` (the default), the
logits at position ``t`` predict token ``t + 1``, so position ``t`` counts when ``labels[t + 1] !=
-100``. Every divergence is averaged over the counted tokens (not over the batch or the padding).

The vocabulary axis is computed in fp32, in chunks of ``chunk_size`` tokens whose gradient is computed
in the forward pass (:mod:`alambic.losses.token_chunks`), so peak memory holds the logits' gradient and
one chunk's ``[chunk, V]`` work rather than every intermediate of every token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.registry import register_loss
from alambic.losses.token_chunks import IGNORE_INDEX, chunked_token_mean


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities ``[n, V]``; ``0 log 0 = 0``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _token_loss(name: str, paper: str):
    return register_loss(name, inputs="tokens", paper=paper)


@_token_loss("forward_kl", "Hinton et al. 2015 per token; Kim & Rush 2016, arXiv:1606.07947")
def forward_kl_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL per token, ``KL(p_teacher || p_student)``: mean-seeking, the student covers every teacher mode.

    ``loss = mean_tokens sum_v p_t(v) (log p_t(v) - log p_s(v)) * T^2``.

    Args:
        student: student logits ``[B, T, V]``; teacher: teacher logits, same shape.
        labels: ``[B, T]`` with ``-100`` where tokens do not count, or None (all count).
        temperature: T; shift_labels: labels are the inputs' ids (HF convention).
        chunk_size: tokens per chunk; None: as many as make 2**20 logits (32 at a 32k vocabulary).
    """
    return temperature**2 * chunked_token_mean(
        lambda s, t: _kl(_log_probs(t, temperature), _log_probs(s, temperature)),
        student, teacher, labels, shift_labels, chunk_size,
    )  # fmt: skip


@_token_loss("reverse_kl", "Gu et al. 2024, MiniLLM, arXiv:2306.08543")
def reverse_kl_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL per token, ``KL(p_student || p_teacher)``: mode-seeking, the student commits to the teacher's main modes.

    ``loss = mean_tokens sum_v p_s(v) (log p_s(v) - log p_t(v)) * T^2``.

    Args: as ``forward_kl``.
    """
    return temperature**2 * chunked_token_mean(
        lambda s, t: _kl(_log_probs(s, temperature), _log_probs(t, temperature)),
        student, teacher, labels, shift_labels, chunk_size,
    )  # fmt: skip


def _generalized_jsd(s: Tensor, t: Tensor, beta: float, temperature: float) -> Tensor:
    log_s, log_t = _log_probs(s, temperature), _log_probs(t, temperature)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_mixture = torch.logsumexp(
        torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0
    )  # log(beta p_t + (1 - beta) p_s)
    return beta * _kl(log_t, log_mixture) + (1 - beta) * _kl(log_s, log_mixture)


@_token_loss("jsd", "Agarwal et al. 2024, On-Policy Distillation (GKD), arXiv:2306.13649")
def generalized_jsd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD): interpolates forward and reverse KL.

    With ``p = softmax(z / T)`` and ``M = beta p_t + (1 - beta) p_s``:
    ``JSD(beta) = beta KL(p_t || M) + (1 - beta) KL(p_s || M)``; ``loss = mean_tokens JSD(beta) * T^2``
    (the ``T^2`` of every temperature-scaled KL here, after Hinton et al.; TRL's GKD trainer has none,
    which only matters at T != 1). As in GKD's reference implementation the end points are the KLs
    themselves: beta = 0 is forward KL, beta = 1 reverse KL (``JSD(beta) / beta`` tends to forward KL
    as beta -> 0, so the family is continuous up to scale).

    Args: as ``forward_kl``, plus beta in [0, 1] (GKD: 0.1 to 0.9; 0.5 is the symmetric JSD).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    return temperature**2 * chunked_token_mean(
        lambda s, t: _generalized_jsd(s, t, beta, temperature),
        student, teacher, labels, shift_labels, chunk_size,
    )  # fmt: skip


@_token_loss("tvd", "Wen et al. 2023, f-Divergence Minimization for Sequence-Level KD, arXiv:2307.15190")
def total_variation_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation distance per token, ``0.5 sum_v |p_t(v) - p_s(v)|`` (bounded in [0, 1]).

    ``loss = mean_tokens 0.5 sum_v |p_t(v) - p_s(v)|`` with ``p = softmax(z / T)``; not a KL, so no
    ``T^2`` scale.

    Args: as ``forward_kl``.
    """
    return chunked_token_mean(
        lambda s, t: 0.5 * (_log_probs(t, temperature).exp() - _log_probs(s, temperature).exp()).abs().sum(-1),
        student, teacher, labels, shift_labels, chunk_size,
    )  # fmt: skip


def _skew(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """``KL(p || alpha p + (1 - alpha) q)`` per row; alpha = 0 is ``KL(p || q)``."""
    if alpha == 0.0:
        return _kl(log_p, log_q)
    log_mixture = torch.logsumexp(torch.stack([log_p + math.log(alpha), log_q + math.log1p(-alpha)]), dim=0)
    return _kl(log_p, log_mixture)


@_token_loss("skew_kl", "Ko et al. 2024, DistiLLM, arXiv:2402.03898")
def skew_forward_kl_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew forward KL per token (DistiLLM): ``KL(p_t || alpha p_t + (1 - alpha) p_s)``; alpha = 0 is forward KL.

    ``loss = mean_tokens KL(p_t || alpha p_t + (1 - alpha) p_s) * T^2``.

    Mixing a little of the teacher into the student's distribution bounds the loss and its gradient
    where the student gives a teacher token almost no mass.

    Args: as ``forward_kl``, plus alpha in [0, 1) (paper: 0.1).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl alpha must be in [0, 1), got {alpha}")
    return temperature**2 * chunked_token_mean(
        lambda s, t: _skew(_log_probs(t, temperature), _log_probs(s, temperature), alpha),
        student, teacher, labels, shift_labels, chunk_size,
    )  # fmt: skip


@_token_loss("skew_reverse_kl", "Ko et al. 2024, DistiLLM, arXiv:2402.03898")
def skew_reverse_kl_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew reverse KL per token (DistiLLM): ``KL(p_s || alpha p_s + (1 - alpha) p_t)``; alpha = 0 is reverse KL.

    ``loss = mean_tokens KL(p_s || alpha p_s + (1 - alpha) p_t) * T^2``.

    Args: as ``forward_kl``, plus alpha in [0, 1) (paper: 0.1).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_reverse_kl alpha must be in [0, 1), got {alpha}")
    return temperature**2 * chunked_token_mean(
        lambda s, t: _skew(_log_probs(s, temperature), _log_probs(t, temperature), alpha),
        student, teacher, labels, shift_labels, chunk_size,
    )  # fmt: skip


@register_loss(
    "lm_ce", inputs="tokens", needs_teacher=False, needs_labels=True, paper="next-token cross-entropy"
)
def next_token_cross_entropy(
    student: Tensor, teacher: Tensor | None = None, *, labels: Tensor | None = None, shift_labels: bool = True
) -> Tensor:
    """Next-token cross-entropy on the labels (the language model's own loss), ``-100`` ignored.

    Args:
        student: logits ``[B, T, V]``; teacher: unused.
        labels: ``[B, T]`` token ids, ``-100`` where a token does not count.
        shift_labels: position ``t`` predicts ``labels[t + 1]`` (HF convention).
    """
    if labels is None:
        raise ValueError("lm_ce needs labels (token ids, -100 where a token does not count)")
    if shift_labels:
        student, labels = student[:, :-1], labels[:, 1:]
    if (labels != IGNORE_INDEX).sum() == 0:
        return student.sum() * 0.0
    return F.cross_entropy(
        student.reshape(-1, student.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
