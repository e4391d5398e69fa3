"""Which attention heads to remove from a BERT-family student, and their removal, then recovery by KD.

- :func:`head_importance` scores every head as Michel, Levy & Neubig 2019 do ("Are Sixteen Heads Really
  Better than One?", https://arxiv.org/abs/1905.10650): a gate of ones multiplies each head's context
  vector, and a head's importance is ``|dL / d gate|`` summed over labelled batches, normalised per layer.
- :func:`select_heads` picks the globally least important fraction (one head kept per layer);
  :func:`prune_heads_by_importance` does both and removes them with
  :func:`alambic.models.surgery.prune_heads` (the layer surgery, and why it works on transformers 5).
- Recovery: :func:`alambic.compress.prune.recover` distills the unpruned model into the pruned one.

Example:
    >>> small = prune_heads_by_importance(copy.deepcopy(student), train_loader, amount=0.5)
    >>> small = recover(small, student, train_loader, keep_zeros=False, optimizer="adamw", lr=1e-4)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import Tensor, nn

from alambic.core.batches import call_model, logits_of, model_device, split_batch
from alambic.core.hooks import transform_inputs
from alambic.errors import ConfigError
from alambic.models.surgery import attention_layers, prune_heads


def head_importance(model: nn.Module, loader: Iterable, *, max_batches: int | None = None) -> Tensor:
    """Importance of every attention head (Michel et al. 2019), normalised per layer: ``[layers, heads]``.

    A gate of ones multiplies each head's context vector where it enters the attention output projection
    (a forward pre-hook, :func:`alambic.core.hooks.transform_inputs`); the outputs are unchanged. For every
    batch the loss ``L`` (cross-entropy of the logits against the batch's labels, padding labels -100
    ignored) is back-propagated to the gates only, and ``|dL / d gate|`` is added up, as the paper's
    reference code does (https://arxiv.org/abs/1905.10650, section 4.1). Each layer's scores are then
    divided by their L2 norm across that layer's heads (the paper's section 4.2 normalisation), so
    scores compare across layers. The model runs in eval mode (no dropout) and its parameters' ``.grad``
    are not touched.

    Args:
        model: A BERT-family model returning logits (``BertForSequenceClassification``).
        loader: Labelled batches: dicts with ``input_ids``, ``attention_mask``, ..., ``labels`` (as
            :class:`alambic.data.text.TokenizedDataset` yields) or ``(inputs, labels)`` tuples.
        max_batches: Stop after this many batches (None: the whole loader).

    Returns:
        ``[layers, max heads]``; a layer with fewer heads (already pruned) has NaN past its last head.

    Example:
        >>> scores = head_importance(student, train_loader, max_batches=20)
        >>> scores.shape
        torch.Size([6, 12])
    """
    layers = attention_layers(model)
    counts = [layer.heads for layer in layers]
    device = model_device(model)
    gates = torch.ones(len(layers), max(counts), device=device, requires_grad=True)  # [L, H]

    def gate(index: int) -> Any:
        heads, size = counts[index], layers[index].head_size

        def apply(context: Tensor) -> Tensor:  # [..., heads * head_size]
            split = context.reshape(*context.shape[:-1], heads, size)  # [..., heads, head_size]
            return (split * gates[index, :heads].to(context.dtype).unsqueeze(-1)).reshape(context.shape)

        return apply

    totals = torch.zeros_like(gates, requires_grad=False)  # [L, H]
    batches, was_training = 0, model.training
    model.eval()
    try:
        with transform_inputs(model, {layer.output_path: gate(i) for i, layer in enumerate(layers)}):
            for batch in loader:
                if max_batches is not None and batches >= max_batches:
                    break
                inputs, labels = split_batch(batch)
                if labels is None:
                    raise ConfigError("head importance needs labelled batches (a 'labels' key or tuple item)")
                logits = logits_of(call_model(model, send_to_device(inputs, device)))  # [B, C] or [B, T, C]
                loss = F.cross_entropy(
                    logits.float().flatten(0, -2), labels.to(device).flatten(), ignore_index=-100
                )
                (gradient,) = torch.autograd.grad(loss, gates)
                totals += gradient.abs()
                batches += 1
    finally:
        model.train(was_training)
    if batches == 0:
        raise ConfigError("head importance got no batches from the loader")
    scores = totals / (totals.norm(dim=1, keepdim=True) + 1e-20)  # L2 = 1 across each layer's heads
    for index, heads in enumerate(counts):
        scores[index, heads:] = float("nan")
    return scores


def select_heads(importance: Tensor, amount: float) -> dict[int, list[int]]:
    """The ``amount`` fraction of heads with the lowest importance, ranked globally, one kept per layer.

    ``importance`` is ``[layers, heads]`` as :func:`head_importance` returns it (NaN: no such head).
    ``floor(amount * heads)`` heads are chosen, least important first; a head whose removal would empty
    its layer is skipped for the next one.

    Example:
        >>> select_heads(torch.tensor([[0.9, 0.1], [0.5, 0.6]]), 0.5)
        {0: [1], 1: [0]}
    """
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"head pruning amount must be in [0, 1), got {amount!r} (0.5 removes half)")
    present = ~torch.isnan(importance)  # [L, H]
    target = math.floor(amount * int(present.sum()))
    left = present.sum(dim=1).tolist()
    chosen: dict[int, list[int]] = {}
    order = torch.argsort(importance.masked_fill(~present, float("inf")).flatten(), stable=True)
    for flat in order.tolist():
        if sum(map(len, chosen.values())) >= target:
            break
        layer, head = divmod(flat, importance.shape[1])
        if present[layer, head] and left[layer] > 1:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def prune_heads_by_importance(
    model: nn.Module, loader: Iterable, amount: float, *, max_batches: int | None = None
) -> nn.Module:
    """Remove the globally least important ``amount`` fraction of heads (:func:`head_importance`), in place.

    At least one head stays in every layer. The removed heads are not returned; call
    :func:`head_importance` and :func:`select_heads` yourself to see them.

    Example:
        >>> small = prune_heads_by_importance(copy.deepcopy(student), train_loader, 0.5, max_batches=20)
    """
    select_heads(torch.zeros(1, 1), amount)  # a bad amount fails before the importance pass
    chosen = select_heads(head_importance(model, loader, max_batches=max_batches), amount)
    return prune_heads(model, chosen)
