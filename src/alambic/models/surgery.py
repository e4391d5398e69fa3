"""Layer surgery: remove units, channels and attention heads from a model, and rebuild a resized model.

- :func:`slice_out` / :func:`slice_in` / :func:`slice_norm` keep chosen rows, columns or channels of a
  layer (channel pruning and head pruning are built on them).
- :func:`load_resized` rebuilds a structurally pruned model from its architecture and its weights file,
  resizing the layers whose stored shape differs.
- Attention heads of BERT-family encoders: :func:`attention_layers` finds them, :func:`prune_heads`
  removes heads physically (each layer's query / key / value lose the heads' output rows and the
  attention output projection the matching input columns), :func:`sync_attention_heads` keeps the
  modules' head counts equal to their shapes, and :func:`load_head_pruned` rebuilds a pruned
  ``save_pretrained`` folder. Which heads to remove is decided in :mod:`alambic.compress.head_pruning`.

Why this works without ``prune_heads`` (gone from transformers 5, with ``config.pruned_heads``): BERT's
self-attention reshapes its projections with ``(*input_shape, -1, attention_head_size)``, so a layer runs
with however many heads its Linear layers hold. A BERT config cannot state per-layer head counts, so a
pruned model is rebuilt from its config and weights by :func:`load_resized`, which resizes the Linear
layers from the stored shapes and then calls :func:`sync_attention_heads`. Supported: models whose
layers have ``attention.self.query / key / value`` and ``attention.output.dense`` (BERT, MiniLM and
other ``BertModel`` checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.errors import ConfigError
from alambic.models.loading import unwrap_model


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ``ModuleList`` of a Transformer's blocks (BERT ``encoder.layer``, Llama ``layers``, GPT-2 ``h``)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and (count is None or len(module) == count)
    ]
    if not candidates:
        raise ConfigError(
            f"cannot find the layer list of {type(model).__name__} (a ModuleList of num_hidden_layers blocks)"
        )
    return min(candidates, key=lambda item: item[0].count("."))  # the outermost such list


def slice_out(layer: nn.Linear | nn.Conv2d, keep: torch.Tensor) -> None:
    """Keep only the output units (rows / channels) ``keep`` of a Linear or Conv2d layer, in place."""
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def slice_in(layer: nn.Linear | nn.Conv2d, keep: torch.Tensor) -> None:
    """Keep only the input features / channels ``keep`` of a Linear or (ungrouped) Conv2d layer, in place."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ConfigError("channel pruning does not handle grouped convolutions")
    layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = len(keep)
    else:
        layer.in_channels = len(keep)


def slice_norm(norm: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    """Keep only the channels ``keep`` of a BatchNorm layer (affine parameters and running statistics)."""
    norm.weight = nn.Parameter(norm.weight.detach()[keep].clone())
    norm.bias = nn.Parameter(norm.bias.detach()[keep].clone())
    norm.running_mean = norm.running_mean[keep].clone()
    norm.running_var = norm.running_var[keep].clone()
    norm.num_features = len(keep)


def load_resized(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load ``state_dict``, first resizing Linear / Conv2d / BatchNorm layers whose stored shape differs.

    This is how a structurally pruned model (fewer channels or hidden units than its architecture's
    defaults) is rebuilt from its architecture and its safetensors file.

    Example:
        >>> pruned = load_resized(build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)), state)
    """
    for name, module in list(model.named_modules()):
        weight = state_dict.get(f"{name}.weight" if name else "weight")
        if weight is None or getattr(module, "weight", None) is None or module.weight.shape == weight.shape:
            continue
        if isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        elif isinstance(module, nn.Conv2d):
            new = nn.Conv2d(
                weight.shape[1] * module.groups,
                weight.shape[0],
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            new = type(module)(weight.shape[0], eps=module.eps, momentum=module.momentum)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.load_state_dict(dict(state_dict))
    sync_attention_heads(model)  # a head-pruned Transformer: head counts follow the resized Linears
    return model


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

    Call it after the Linear layers were resized (as :func:`load_resized` does); a model
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


def _remove(layer: AttentionLayer, removed: Sequence[int]) -> None:
    size, inner = layer.head_size, layer.self_attention
    kept = [head for head in range(layer.heads) if head not in set(removed)]
    rows = torch.cat([torch.arange(head * size, (head + 1) * size) for head in kept])  # [kept * size]
    rows = rows.to(inner.query.weight.device)
    for linear in (inner.query, inner.key, inner.value):
        slice_out(linear, rows)  # the heads' output rows of Q, K and V
    slice_in(layer.output, rows)  # and the projection's input columns that read their context
    inner.num_attention_heads = len(kept)
    inner.all_head_size = len(kept) * size


def prune_heads(model: nn.Module, heads: Mapping[int, Sequence[int]]) -> nn.Module:
    """Remove attention heads physically: ``{layer: [head, ...]}``, indices as the model has them now.

    Every request is checked before anything changes. A layer must keep at least one head; to remove
    a whole layer, derive a student without it (``alambic derive`` / :func:`alambic.models.hf.derive_student`).

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
    model from the config and loads ``model.safetensors`` with :func:`load_resized`.
    :func:`alambic.models.hf.load_hf_model` calls it for such folders.

    Example:
        >>> model = load_head_pruned("runs/pruned", transformers.AutoModelForSequenceClassification)
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

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
