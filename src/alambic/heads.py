"""Structured attention-head pruning for BERT-family Transformer students, then recovery by distillation.

- :func:`head_importance` scores every head as Michel, Levy & Neubig 2019 do ("Are Sixteen Heads Really
  Better than One?", https://arxiv.org/abs/1905.10650): a gate of ones multiplies each head's context
  vector, and a head's importance is ``|dL / d gate|`` summed over labelled batches, normalised per layer.
- :func:`prune_heads` removes heads physically: each layer's query / key / value Linear layers lose the
  heads' output rows and the attention output projection loses the matching input columns, so
  parameters, FLOPs and latency fall. Layers may keep different numbers of heads.
- :func:`prune_heads_by_importance` removes the globally least important fraction of heads.
- Recovery: :func:`alambic.prune.recover` distills the unpruned model into the pruned one.

Why this works without ``prune_heads`` (gone from transformers 5, with ``config.pruned_heads``): BERT's
self-attention reshapes its projections with ``(*input_shape, -1, attention_head_size)``, so a layer
runs with however many heads its Linear layers hold; :func:`sync_attention_heads` keeps the modules'
``num_attention_heads`` / ``all_head_size`` equal to those shapes. A BERT config cannot state per-layer
head counts, so a pruned model is rebuilt from its config and weights file by
:func:`alambic.export.load_resized`, which resizes the Linear layers from the stored shapes and then
calls :func:`sync_attention_heads`. Supported: models whose layers have ``attention.self.query / key /
value`` and ``attention.output.dense`` (BERT, MiniLM and other ``BertModel`` checkpoints).

Example:
    >>> small = prune_heads_by_importance(copy.deepcopy(student), train_loader, amount=0.5)
    >>> small = recover(small, student, train_loader, keep_zeros=False, optimizer="adamw", lr=1e-4)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.errors import ConfigError

SUPPORTED = (
    "BERT-family encoders (BertModel, BertForSequenceClassification, MiniLM: layers with "
    "attention.self.query/key/value and attention.output.dense)"
)


# config.json key written by prune_heads: the heads kept per layer (a BERT config has one count for all)
HEADS_KEY = "alambic_heads_per_layer"


@dataclass
class AttentionLayer:
    """One encoder layer's self-attention module and its output projection, with the projection's path."""

    self_attention: nn.Module
    output: nn.Linear
    output_path: str

    @property
    def head_size(self) -> int:
        return int(self.self_attention.attention_head_size)

    @property
    def heads(self) -> int:
        return self.self_attention.query.out_features // self.head_size


def _is_self_attention(module: Any) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("query", "key", "value")) and (
        isinstance(getattr(module, "attention_head_size", None), int)
    )


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The self-attention of each encoder layer, in order; a one-line error for other architectures."""
    from alambic.hf import layer_list
    from alambic.hooks import unwrap_model

    model = unwrap_model(model)
    try:
        path, blocks = layer_list(model)
    except ConfigError:
        path, blocks = "", []
    layers = []
    for index, block in enumerate(blocks):
        attention = getattr(block, "attention", None)
        inner = getattr(attention, "self", None)
        output = getattr(getattr(attention, "output", None), "dense", None)
        if not (_is_self_attention(inner) and isinstance(output, nn.Linear)):
            layers = []
            break
        layers.append(AttentionLayer(inner, output, f"{path}.{index}.attention.output.dense"))
    if not layers:
        raise ConfigError(f"attention-head pruning supports {SUPPORTED}, not {type(model).__name__}")
    return layers


def sync_attention_heads(model: nn.Module) -> list[int]:
    """Set each self-attention's ``num_attention_heads`` / ``all_head_size`` from its Linear shapes.

    Call it after the Linear layers were resized (as :func:`alambic.export.load_resized` does); a model
    without BERT-style attention is left alone. Returns the head count of each attention module found.

    Example:
        >>> load_resized(BertForSequenceClassification(config), load_file("pruned.safetensors"))
        >>> sync_attention_heads(model)   # already done by load_resized; returns e.g. [12, 9, 6, ...]
    """
    counts = []
    for module in model.modules():
        if _is_self_attention(module) and hasattr(module, "num_attention_heads"):
            heads = module.query.out_features // module.attention_head_size
            module.num_attention_heads = heads
            module.all_head_size = heads * module.attention_head_size
            counts.append(heads)
    return counts


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):
        return {key: _to(value, device) for key, value in inputs.items()}
    return inputs.to(device) if isinstance(inputs, Tensor) else inputs


def head_importance(model: nn.Module, loader: Iterable, *, max_batches: int | None = None) -> Tensor:
    """Importance of every attention head (Michel et al. 2019), normalised per layer: ``[layers, heads]``.

    A gate of ones multiplies each head's context vector where it enters the attention output projection
    (a forward pre-hook, :func:`alambic.hooks.transform_inputs`); the outputs are unchanged. For every
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
    from alambic.batches import call_model, logits_of, split_batch
    from alambic.hooks import transform_inputs

    layers = attention_layers(model)
    counts = [layer.heads for layer in layers]
    device = _device_of(model)
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
                logits = logits_of(call_model(model, _to(inputs, device)))  # [B, C] or [B, T, C]
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


def _remove(layer: AttentionLayer, removed: Sequence[int]) -> None:
    from alambic.prune import _slice_in, _slice_out

    size, inner = layer.head_size, layer.self_attention
    kept = [head for head in range(layer.heads) if head not in set(removed)]
    rows = torch.cat([torch.arange(head * size, (head + 1) * size) for head in kept])  # [kept * size]
    rows = rows.to(inner.query.weight.device)
    for linear in (inner.query, inner.key, inner.value):
        _slice_out(linear, rows)  # the heads' output rows of Q, K and V
    _slice_in(layer.output, rows)  # and the projection's input columns that read their context
    inner.num_attention_heads = len(kept)
    inner.all_head_size = len(kept) * size


def prune_heads(model: nn.Module, heads: Mapping[int, Sequence[int]]) -> nn.Module:
    """Remove attention heads physically: ``{layer: [head, ...]}``, indices as the model has them now.

    Every request is checked before anything changes. A layer must keep at least one head; to remove
    a whole layer, derive a student without it (``alambic derive`` / :func:`alambic.hf.derive_student`).

    Args:
        model: A BERT-family model (see the module docstring); modified in place (deep-copy it first to
            keep the original).
        heads: Layer index -> head indices to remove from that layer.

    Returns:
        The same model object, with fewer parameters.

    Example:
        >>> prune_heads(model, {0: [1, 3], 5: [0]})
    """
    layers = attention_layers(model)
    plan: dict[int, list[int]] = {}
    for layer, removed in heads.items():
        if not 0 <= int(layer) < len(layers):
            raise ConfigError(f"no layer {layer}: the model has layers 0..{len(layers) - 1}")
        count = layers[int(layer)].heads
        removed = sorted({int(head) for head in removed})
        bad = [head for head in removed if not 0 <= head < count]
        if bad:
            raise ConfigError(f"layer {layer} has heads 0..{count - 1}; cannot remove {bad}")
        if len(removed) == count:
            raise ConfigError(
                f"removing all {count} heads of layer {layer} leaves it no attention; drop the layer "
                "instead with `alambic derive` (derive_student(..., keep=[...]))"
            )
        plan[int(layer)] = removed
    for layer, removed in plan.items():
        if removed:
            _remove(layers[layer], removed)
    config = getattr(model, "config", None)
    if config is not None:  # saved by save_pretrained: tells load_hf_model to rebuild from the shapes
        setattr(config, HEADS_KEY, [layer.heads for layer in layers])
    return model


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


def is_head_pruned(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model saved after :func:`prune_heads` (its config.json says so)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return HEADS_KEY in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_head_pruned(
    folder: str | Path, auto: Any, *, num_labels: int | None = None, **kwargs: Any
) -> nn.Module:
    """Rebuild a head-pruned model saved with ``save_pretrained``: its config, then its weights' shapes.

    ``from_pretrained`` would build every layer with the config's head count and stop on (or, with
    ``ignore_mismatched_sizes``, silently re-initialise) the smaller attention weights; this builds the
    model from the config and loads ``model.safetensors`` with :func:`alambic.export.load_resized`.
    :func:`alambic.hf.load_hf_model` calls it for such folders.

    Example:
        >>> model = load_head_pruned("runs/pruned", transformers.AutoModelForSequenceClassification)
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from alambic.export import load_resized

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    if num_labels is not None and num_labels != getattr(config, "num_labels", num_labels):
        raise ConfigError(
            f"{folder} is a head-pruned model with {config.num_labels} labels, not {num_labels}; load it "
            "without num_labels (or prune a model that already has the right head)"
        )
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{weights} does not exist; save the pruned model with save_pretrained")
    options = {k: v for k, v in kwargs.items() if k == "attn_implementation"}
    # an Auto class builds from a config with from_config; a model class (BertForSequenceClassification) is called
    model = auto.from_config(config, **options) if hasattr(auto, "from_config") else auto(config)
    state = load_file(str(weights))
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ConfigError(
            f"{weights} lacks {len(missing)} tensors ({missing[0]}, ...); head-pruned folders are read for "
            "encoders and sequence classifiers"
        )
    return load_resized(model, state).eval()
