"""What a batch and a model output look like to alambic, in one place (the loop and evaluation share it).

A batch is ``(inputs, labels)`` or ``(inputs, labels, index)`` (``index``: the samples' positions in
the data set, which CRD's memory bank and a cached teacher need), or a dict whose ``labels`` and
``index`` keys hold those and whose other keys are the model's keyword arguments (Hugging Face style). A model output is a
tensor of logits, a dict with ``logits``, an object with ``.logits``, or a tuple whose first item is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from alambic.errors import AlambicError


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)``; labels are None for a bare tensor or a dict without ``labels``."""
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key not in ("labels", "index")}
        return inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise AlambicError("a batch tuple must be (inputs, labels); got a tuple of one item")
        return batch[0], batch[1]
    return batch, None


def index_of(batch: Any) -> Tensor | None:
    """The batch's sample indices (third tuple item or ``index`` key), or None when it carries none."""
    if isinstance(batch, Mapping):
        return batch.get("index")
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[2]
    return None


def call_model(model: nn.Module, inputs: Any, **options: Any) -> Any:
    """Call ``model`` with a dict as keyword arguments, anything else as one positional argument.

    ``options`` (such as ``output_hidden_states=True`` for a Hugging Face model) are added as keywords.
    """
    return model(**inputs, **options) if isinstance(inputs, Mapping) else model(inputs, **options)


# read from the model's output object, not by hooks; "embedding" is the mean of the last hidden state
# over real tokens (sentence-transformers' pooling)
OUTPUT_FIELDS = ("hidden_states", "attentions", "embedding")


def is_output_field(path: str) -> bool:
    """Whether a term side names an output field (``hidden_states.3``, ``attentions.-1``, ``embedding``)."""
    return path.split(".")[0] in OUTPUT_FIELDS


def output_options(paths: list[str]) -> dict[str, bool]:
    """The keyword flags that make a Hugging Face model return the fields ``paths`` name."""
    fields = {path.split(".")[0] for path in paths if is_output_field(path)} - {"embedding"}
    return {f"output_{field}": True for field in sorted(fields)}


def mean_pooled(output: Any, mask: Tensor | None) -> Tensor:
    """The mean of the last hidden state over real tokens: a sentence embedding ``[B, D]``."""
    hidden = (
        output.get("last_hidden_state")
        if isinstance(output, Mapping)
        else getattr(output, "last_hidden_state", None)
    )
    if hidden is None:
        raise AlambicError(
            "'embedding' needs a model output with last_hidden_state (load the model with task: embedding)"
        )
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def read_output_field(output: Any, path: str, mask: Tensor | None = None) -> Tensor:
    """``hidden_states.3`` -> ``output.hidden_states[3]``: one layer's value from a model output object."""
    if path == "embedding":
        return mean_pooled(output, mask)
    field, _, layer = path.partition(".")
    values = output.get(field) if isinstance(output, Mapping) else getattr(output, field, None)
    if not values:
        raise AlambicError(
            f"the model returned no {field!r}; it must be a Hugging Face model that supports "
            f"output_{field}=True"
            + (" (load it with attn_implementation='eager')" if field == "attentions" else "")
        )
    try:
        return values[int(layer)]
    except (ValueError, IndexError):
        raise AlambicError(
            f"{path!r}: the model returned {len(values)} {field} (indices 0..{len(values) - 1} or -1); "
            f"write {field}.N"
        ) from None


def logits_of(output: Any) -> Tensor:
    """The logits of a model output (see the module docstring for the accepted shapes)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise AlambicError(
        f"cannot find logits in a model output of type {type(output).__name__}; return a tensor of "
        "logits, a dict with a 'logits' key, or an object with a .logits attribute"
    )


Inputs = Tensor | Mapping[str, Tensor]  # a batch of images, or of token tensors {key: [N, T]}


def stack_inputs(samples: list[Any]) -> Inputs:
    """``(input, label)`` samples as one batch: a tensor ``[N, ...]`` or a dict of ``[N, T]`` tensors."""
    if isinstance(samples[0], Mapping):  # a Hugging Face style sample: {"input_ids": ..., "labels": ...}
        samples = [({k: v for k, v in sample.items() if k not in ("labels", "index")},) for sample in samples]
    if isinstance(samples[0][0], Mapping):
        return {key: torch.stack([torch.as_tensor(s[0][key]) for s in samples]) for key in samples[0][0]}
    return torch.stack([torch.as_tensor(sample[0]) for sample in samples])  # [N, ...]


def real_inputs(dataset: Any, count: int) -> Inputs:
    """``count`` inputs of a data set, evenly spread over it, as one batch (tensor or dict of tensors)."""
    count = min(count, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    return stack_inputs([dataset[index] for index in indices])


def take(inputs: Inputs, count: int) -> Inputs:
    """The first ``count`` samples of a batch (tensor or dict of tensors)."""
    if isinstance(inputs, Mapping):
        return {key: value[:count] for key, value in inputs.items()}
    return inputs[:count]


def batch_size_of(inputs: Inputs) -> int:
    """How many samples a batch holds."""
    return len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)


def example_input(dataset: Any) -> Inputs:
    """The first sample's inputs as a batch of one (tensors, numpy arrays, or dicts of them)."""
    return real_inputs(dataset, 1)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer; CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
