"""What a batch and a model output look like to alambic, in one place (the loop and evaluation share it).

A batch is ``(inputs, labels)`` or ``(inputs, labels, index)`` (``index``: the samples' positions in
the data set, which CRD's memory bank and a cached teacher need), or a dict whose ``labels`` and
``index`` keys hold those and whose other keys are the model's keyword arguments (Hugging Face style). A model output is a
tensor of logits, a dict with ``logits``, an object with ``.logits``, or a tuple whose first item is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a dict as keyword arguments, anything else as one positional argument."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


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
