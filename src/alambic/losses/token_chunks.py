"""Chunked token divergences whose gradient is computed chunk by chunk in the forward pass.

A token divergence over a 32k vocabulary computed whole holds several ``[tokens, V]`` fp32 tensors
at once (both log-probabilities, the teacher's probabilities, their product, and as many gradients).
Here each chunk of ``chunk_size`` counted tokens is gathered, its per-token divergence and that
divergence's gradient with respect to the chunk's student logits are computed (a local autograd pass
on ``[chunk, V]``), and the chunk is freed: the forward pass keeps only the gradient, which the
backward pass hands on, so no chunk is computed twice (activation checkpointing would recompute each
one) and peak memory is the gradient plus one chunk's work.

:func:`fused_linear_token_loss` goes one step further, after Liger-Kernel's fused linear
cross-entropy and JSD (Hsu et al. 2024, arXiv:2410.10989): it takes the student's last hidden states
and output projection, so the student's ``[tokens, V]`` logits exist one chunk at a time and the
gradient kept is that of the hidden states ``[tokens, H]`` and of the projection ``[V, H]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ConfigError
from alambic.losses.registry import check_hyper_parameters, get_loss, get_loss_spec, list_losses

IGNORE_INDEX = -100
# tokens per chunk when chunk_size is None: as many as make 2**20 logits (4 MiB in fp32 per [chunk, V]
# tensor; 32 tokens at a 32k vocabulary). Peak memory is the logits' gradient plus about eight such
# tensors of one chunk's work, and smaller chunks cost no time at this size (BENCHMARKS.md, "Token-level
# KD memory": 2**21 held 63 MiB of work beside a 250 MiB gradient, 3.98x less than the naive loss)
CHUNK_LOGITS = 2**20
# the fused projection + loss: its chunks also run a [chunk, H] x [H, V] matmul, which small chunks slow
FUSED_CHUNK_LOGITS = 2**21
PerToken = Callable[[Tensor, Tensor], Tensor]  # (student rows [n, V], teacher rows [n, V]) -> [n]


def counted_positions(shape: torch.Size, labels: Tensor | None, shift_labels: bool) -> tuple[Tensor, ...]:
    """Index tensors of the positions of ``[B, T, ...]`` (or ``[N, ...]``) whose next (or own) label counts.

    ``x[counted_positions(...)]`` is ``[N, ...]``; with ``shift_labels`` position ``t`` counts when
    ``labels[t + 1] != -100`` (a 2-D input is already one row per token and is never shifted).
    """
    if len(shape) == 2:
        rows = (
            torch.arange(shape[0]) if labels is None else (labels.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]
        )
        return (rows.to(labels.device if labels is not None else "cpu"),)
    batch, length = shape[0], shape[1]
    keep = torch.ones(batch, length, dtype=torch.bool, device=None if labels is None else labels.device)
    if shift_labels:
        keep[:, -1] = False
        if labels is not None:
            keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    elif labels is not None:
        keep = labels != IGNORE_INDEX
    return tuple(keep.nonzero().unbind(1))  # (batch index [N], position [N])


def _tokens_per_chunk(chunk_size: int | None, vocabulary: int, logits: int | None = None) -> int:
    if chunk_size is None:  # the module's constant read at call time (tests patch it)
        return max(1, (CHUNK_LOGITS if logits is None else logits) // vocabulary)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
    return chunk_size


def _value_and_grad(per_token: PerToken, student: Tensor, teacher: Tensor, needs_grad: bool):
    """``sum per_token(student, teacher)`` and its gradient with respect to ``student [n, V]`` (or None)."""
    if not needs_grad:
        return per_token(student, teacher).sum(), None
    with torch.enable_grad():
        student = student.detach().requires_grad_(True)
        value = per_token(student, teacher).sum()
        (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


def _scaled_once(ctx, grad_output: Tensor) -> list[Tensor | None]:
    """The gradients kept by the forward pass times ``grad_output``, scaled in place and handed over.

    Kept as ``ctx`` attributes rather than saved tensors so that backward can drop its reference: the
    gradient it returns is then the only one, and no second ``[tokens, V]`` tensor is made to scale it
    or to store it in a leaf's ``.grad``. The price: one backward pass per forward pass.
    """
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(
            "a chunked token loss keeps its gradient for one backward pass; compute the loss again "
            "rather than calling backward twice (retain_graph=True)"
        )
    if torch.equal(grad_output, torch.ones_like(grad_output)):
        return grads
    return [None if grad is None else grad.mul_(grad_output) for grad in grads]


class _ChunkedMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, positions, per_token, chunk_size, needs_grad):
        # positions None: every row of a 2-D input, in order, indexed by slices (views, not copies)
        count = student.shape[0] if positions is None else positions[0].numel()
        grad = (
            torch.zeros_like(student)
            if needs_grad and (count > chunk_size or positions is not None)
            else None
        )
        total = student.new_zeros((), dtype=torch.float32)
        for start in range(0, count, chunk_size):
            if positions is None:
                index = slice(start, start + chunk_size)
            else:
                index = tuple(axis[start : start + chunk_size] for axis in positions)
            value, chunk_grad = _value_and_grad(per_token, student[index], teacher[index], needs_grad)
            total += value
            if needs_grad and grad is None:  # one chunk that is the whole input: its gradient is the gradient
                grad = chunk_grad.div_(count)
            elif needs_grad:
                grad[index] = chunk_grad.div_(count)
        ctx.grads = [grad]
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        return *_scaled_once(ctx, grad_output), None, None, None, None, None


def chunked_token_mean(
    per_token: PerToken,
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    shift_labels: bool,
    chunk_size: int | None,
) -> Tensor:
    """Mean over counted tokens of ``per_token(student_rows, teacher_rows) -> [n]``, chunk by chunk.

    Args:
        per_token: the divergence of each row of two ``[n, V]`` logits.
        student: logits ``[B, T, V]`` or ``[N, V]``; teacher: the same shape (detached here).
        labels: ``[B, T]`` (or ``[N]``), ``-100`` where a token does not count, or None.
        shift_labels: position ``t`` counts when ``labels[t + 1]`` does.
        chunk_size: tokens per chunk; None: ``CHUNK_LOGITS // V`` (32 at a 32k vocabulary).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
            "token losses need one tokenizer and one vocabulary size"
        )
    chunk_size = _tokens_per_chunk(chunk_size, student.shape[-1])
    positions = counted_positions(student.shape, labels, shift_labels)
    if positions[0].numel() == 0:  # every token masked: contribute nothing, keep the graph
        return student.sum() * 0.0
    positions = (
        None
        if student.dim() == 2 and labels is None
        else tuple(axis.to(student.device) for axis in positions)
    )
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    return _ChunkedMean.apply(student, teacher.detach(), positions, per_token, chunk_size, needs_grad)


class _FusedLinearMean(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, teacher, project_teacher, positions, chunk_loss, chunk_size, needs_grad
    ):
        count = positions[0].numel()
        grad_hidden = torch.zeros_like(hidden) if needs_grad[0] else None
        # the projection's gradient is a sum over every chunk: accumulated in fp32 whatever the weight's dtype
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_grad[2] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, count, chunk_size):
            index = tuple(axis[start : start + chunk_size] for axis in positions)
            hidden_rows = hidden[index]  # [n, H]
            logits = F.linear(hidden_rows, weight, bias)  # [n, V]: the only student logits that exist
            value, grad_logits = _value_and_grad(
                chunk_loss, logits, project_teacher(teacher[index]), any(needs_grad)
            )
            total += value
            if grad_hidden is not None:
                grad_hidden[index] = grad_logits @ weight  # [n, H]
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().float(), hidden_rows.float())  # [V, H]
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        grads = [grad if grad is None else grad.div_(count).to(like.dtype)
                 for grad, like in zip((grad_hidden, grad_weight, grad_bias), (hidden, weight, bias))]  # fmt: skip
        ctx.grads = grads
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        return *_scaled_once(ctx, grad_output), None, None, None, None, None, None


def fused_linear_token_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor,
    *,
    loss: str = "forward_kl",
    params: dict | None = None,
    bias: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    labels: Tensor | None = None,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """A token loss on ``hidden @ weight.T + bias`` without ever holding the student's whole logits.

    Equals ``get_loss(loss)(F.linear(hidden, weight, bias), teacher, labels=labels, **params)`` (same
    masking, temperature and ``T^2``), in value and in its gradient with respect to ``hidden``, ``weight``
    and ``bias``; the student's ``[chunk, V]`` logits exist one chunk at a time, in the forward pass
    and the backward pass (which only scales gradients computed chunk by chunk in the forward pass).
    With ``teacher_weight``, ``teacher`` is the teacher's last hidden states and its logits are made
    one chunk at a time too.

    Alambic's loop runs the whole student, which computes its logits anyway, so this is not a
    registered loss: it is for a loop of your own that calls the student's body (for a Hugging Face
    causal LM, ``model.model(input_ids).last_hidden_state`` and ``model.lm_head.weight``).

    Args:
        hidden: the student's last hidden states ``[B, T, H]`` (or ``[N, H]``).
        weight: the student's output projection ``[V, H]``; bias: ``[V]`` or None.
        teacher: teacher logits ``[B, T, V]``, or with ``teacher_weight [V, H_t]`` (and
            ``teacher_bias``) the teacher's last hidden states ``[B, T, H_t]``.
        loss: a registered token divergence (forward_kl, reverse_kl, jsd, tvd, skew_kl,
            skew_reverse_kl); params: its hyper-parameters (``temperature``, ``beta``, ``alpha``).
        labels, shift_labels, chunk_size: as the token losses, but None is ``FUSED_CHUNK_LOGITS // V``
            (64 at a 32k vocabulary; 256 tokens ran 13% faster at hidden size 512, for 2.5x the memory).

    Example:
        >>> hidden = model.model(input_ids).last_hidden_state
        >>> loss = fused_linear_token_loss(hidden, model.lm_head.weight, teacher_logits,
        ...                                loss="jsd", params={"beta": 0.5}, labels=labels)
    """
    params = _fused_params(loss, params)
    vocabulary = teacher.shape[-1] if teacher_weight is None else teacher_weight.shape[0]
    chunk_size = _tokens_per_chunk(chunk_size, vocabulary, FUSED_CHUNK_LOGITS)
    project_teacher = (lambda rows: rows) if teacher_weight is None else (
        lambda rows: F.linear(rows, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    )  # fmt: skip
    _check_fused_shapes(hidden, weight, teacher, teacher_weight)
    positions = counted_positions(hidden.shape, labels, shift_labels)
    if positions[0].numel() == 0:  # every token masked: contribute nothing, keep the graph
        return sum(tensor.sum() * 0.0 for tensor in (hidden, weight, bias) if tensor is not None)
    positions = tuple(axis.to(hidden.device) for axis in positions)
    loss_fn = get_loss(loss)

    def chunk_loss(student_rows: Tensor, teacher_rows: Tensor) -> Tensor:  # the sum over the chunk's rows
        rows = student_rows.shape[0]
        return loss_fn(student_rows, teacher_rows, shift_labels=False, chunk_size=rows, **params) * rows

    needs_grad = tuple(
        torch.is_grad_enabled() and tensor is not None and tensor.requires_grad
        for tensor in (hidden, weight, bias)
    )
    return _FusedLinearMean.apply(
        hidden, weight, bias, teacher.detach(), project_teacher, positions, chunk_loss, chunk_size, needs_grad
    )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Next-token cross-entropy (``lm_ce``) on ``hidden @ weight.T + bias``, the logits one chunk at a time.

    Equals ``get_loss("lm_ce")(F.linear(hidden, weight, bias), labels=labels)`` in value and gradients
    (Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989, on the CPU too).

    Args:
        hidden: ``[B, T, H]``; weight: ``[V, H]``; bias: ``[V]`` or None.
        labels: ``[B, T]`` token ids, ``-100`` where a token does not count.
        shift_labels, chunk_size: as :func:`fused_linear_token_loss`.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} "
            "do not fit: hidden [B, T, H], weight [V, H], labels [B, T]"
        )
    chunk_size = _tokens_per_chunk(chunk_size, weight.shape[0], FUSED_CHUNK_LOGITS)
    targets = labels
    if shift_labels:  # position t predicts labels[t + 1]; the last position predicts nothing
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    positions = counted_positions(hidden.shape, labels, shift_labels)
    if positions[0].numel() == 0:  # every token masked: contribute nothing, keep the graph
        return sum(tensor.sum() * 0.0 for tensor in (hidden, weight, bias) if tensor is not None)
    positions = tuple(axis.to(hidden.device) for axis in positions)
    needs_grad = tuple(
        torch.is_grad_enabled() and tensor is not None and tensor.requires_grad
        for tensor in (hidden, weight, bias)
    )
    return _FusedLinearMean.apply(
        hidden,
        weight,
        bias,
        targets,
        lambda rows: rows,
        positions,
        _cross_entropy_sum,
        chunk_size,
        needs_grad,
    )


def _cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")  # [n, V], [n] -> the chunk's sum


def _fused_params(loss: str, params: dict | None) -> dict:
    """``params`` checked for ``loss``, which must be a registered token divergence."""
    spec = get_loss_spec(loss)
    if spec.inputs != "tokens" or not spec.needs_teacher:
        divergences = [
            other.name for other in list_losses() if other.inputs == "tokens" and other.needs_teacher
        ]
        raise ConfigError(
            f"fused_linear_token_loss takes a token divergence ({', '.join(divergences)}), got {loss!r}"
        )
    params = dict(params or {})
    check_hyper_parameters(loss, params)
    if {"chunk_size", "shift_labels"} & set(params):
        raise ConfigError(
            "give chunk_size and shift_labels as arguments of fused_linear_token_loss, not in params"
        )
    return params


def _check_fused_shapes(
    hidden: Tensor, weight: Tensor, teacher: Tensor, teacher_weight: Tensor | None
) -> None:
    """hidden ``[B, T, H]``, weight ``[V, H]``, teacher logits ``[B, T, V]`` (or hidden states ``[B, T, H_t]``
    with teacher_weight ``[V, H_t]``), else a ValueError naming every shape."""
    vocabulary = weight.shape[0] if teacher_weight is None else teacher_weight.shape[0]
    if hidden.shape[:-1] != teacher.shape[:-1] or hidden.shape[-1] != weight.shape[1] or (
        teacher_weight is None and teacher.shape[-1] != weight.shape[0]
    ) or weight.shape[0] != vocabulary:  # fmt: skip
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and teacher {tuple(teacher.shape)}"
            + ("" if teacher_weight is None else f" (teacher_weight {tuple(teacher_weight.shape)})")
            + " do not fit: hidden [B, T, H], weight [V, H], teacher logits [B, T, V] (or hidden [B, T, H_t] "
            "with teacher_weight [V, H_t])"
        )
