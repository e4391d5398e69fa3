"""Export of students that take a dict of tensors (Hugging Face Transformers on tokenized text).

ONNX and ``torch.export`` trace positional tensors, while a Transformer is called with keyword
arguments (``input_ids``, ``attention_mask``, ``token_type_ids``) and returns an output object. The
usual bridge is a small wrapper, :class:`PositionalLogits`, that maps positional tensors to the model's
keywords and returns the logits; the export then has one input per key, each with a dynamic batch and
sequence dimension, and one output ``logits``. Only the keys the model's ``forward`` accepts are kept.

The safetensors export of a Transformer is a folder written by ``save_pretrained`` (``model.safetensors``
and ``config.json``) with the tokenizer next to it: weights alone cannot rebuild a Transformer, and this
is the layout ``transformers``, Optimum and inference servers load directly (``from_pretrained``).

Example:
    >>> names = input_names(student, batch)      # ['input_ids', 'attention_mask', 'token_type_ids']
    >>> wrapped = PositionalLogits(student, names)
    >>> wrapped(*(batch[name] for name in names)).shape
    torch.Size([8, 2])
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.compress.parity import check_finite, reference_outputs
from alambic.core.batches import logits_of
from alambic.data.text import load_tokenizer
from alambic.data.tokenizers import TOKENIZER_FILE
from alambic.errors import AlambicError
from alambic.files import dumps_json
from alambic.models.surgery import is_head_pruned, load_head_pruned

INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


def input_names(model: nn.Module, inputs: Mapping[str, Tensor]) -> list[str]:
    """The keys of ``inputs`` that ``model.forward`` takes: ``input_ids``, ``attention_mask``,
    ``token_type_ids`` first, then any others alphabetically."""
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    # named parameters only: Transformers' forward also takes **kwargs, which would swallow (and the
    # export would carry) inputs such as token_type_ids that the model ignores
    names = [key for key in inputs if key in parameters] or (list(inputs) if takes_any else [])
    if not names:
        raise AlambicError(
            f"{type(model).__name__}.forward takes none of the inputs {sorted(inputs)}; cannot export it"
        )
    rank = {name: index for index, name in enumerate(INPUT_ORDER)}
    return sorted(names, key=lambda name: (rank.get(name, len(INPUT_ORDER)), name))


class PositionalLogits(nn.Module):
    """``model(**dict(zip(names, tensors)))``'s logits: a keyword-argument model as a positional one."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return logits_of(self.model(**dict(zip(self.names, tensors, strict=True))))


def traceable(model: nn.Module, example: Any) -> tuple[nn.Module, tuple, list[str], tuple]:
    """What the exporters trace: ``(module, positional example, input names, dynamic shapes)``.

    A tensor input keeps the model as it is (input ``input``, dynamic batch); a dict is wrapped in
    :class:`PositionalLogits` with dynamic batch and sequence dimensions on every input.
    """
    batch = torch.export.Dim("batch")
    if not isinstance(example, Mapping):
        return model, (example,), ["input"], ({0: batch},)
    names = input_names(model, example)
    # position embeddings bound the sequence length; torch.export wants the bound stated
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    sequence = (
        torch.export.Dim("sequence", max=longest)
        if isinstance(longest, int)
        else torch.export.Dim("sequence")
    )
    # one entry per forward parameter: the *tensors varargs take a tuple, one shape per tensor
    shapes = (tuple({0: batch, 1: sequence} for _ in names),)
    return PositionalLogits(model, names).eval(), tuple(example[name] for name in names), names, shapes


def shorter_sample(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The first sample alone, cut to its real tokens (another batch size and sequence length to check)."""
    length = inputs["input_ids"].shape[1]
    mask = inputs.get("attention_mask")
    if mask is not None:
        length = max(2, int(mask[0].sum()))  # its real tokens, at least 2 (as the traced example)
    return {key: value[:1, :length] for key, value in inputs.items()}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while an architecture is rebuilt: the run's weights replace
    the loaded ones next, so its "classifier MISSING" lines would only mislead."""
    try:
        import transformers
    except ImportError:
        yield
        return
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (it has ``save_pretrained`` and a ``config``)."""
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def save_hf_folder(
    model: nn.Module, folder: str | Path, *, tokenizer: Any = None, description: dict | None = None
) -> Path:
    """Write ``model`` with ``save_pretrained`` (safetensors) and its tokenizer into ``folder``, staged.

    ``tokenizer``: a tokenizer object, a folder or hub id to load it from, a folder holding alambic's
    ``alambic-tokenizer.json`` (copied in), or None. The folder is
    written aside and renamed into place, so a failure leaves no half-written export.

    Example:
        >>> save_hf_folder(student, "export/student-hf", tokenizer="path/to/teacher")
    """
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if isinstance(tokenizer, str | Path) and (Path(tokenizer) / TOKENIZER_FILE).is_file():
            # alambic's byte / character tokenizer (a language-model run's): its spec, read by
            # alambic.data.load_tokenizer(folder); transformers has no class for it
            shutil.copy2(Path(tokenizer) / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        elif tokenizer is not None:
            if isinstance(tokenizer, str | Path):
                tokenizer = load_tokenizer(str(tokenizer))
            tokenizer.save_pretrained(staging)
        (staging / "alambic.json").write_text(dumps_json(description or {}, indent=2, sort_keys=True))
        if not (staging / "model.safetensors").is_file():
            raise AlambicError(f"save_pretrained wrote no model.safetensors into {staging}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def replace_folder(staging: Path, folder: Path) -> Path:
    """Move a checked ``staging`` folder to ``folder``, replacing an earlier export there."""
    if folder.exists():
        if folder.is_dir() and (folder / "alambic.json").is_file():
            shutil.rmtree(folder)  # an earlier export of ours
        else:
            shutil.rmtree(staging, ignore_errors=True)
            raise AlambicError(f"{folder} exists and is not an earlier alambic export; choose another --out")
    os.replace(staging, folder)
    return folder


def load_hf_folder(folder: str | Path, like: nn.Module) -> nn.Module:
    """Load an exported folder with the class of ``like`` (``from_pretrained``), in eval mode.

    A head-pruned model (per-layer head counts, which its config cannot state) is rebuilt from its
    config and the stored weight shapes (:func:`alambic.models.surgery.load_head_pruned`)."""
    if is_head_pruned(folder):
        return load_head_pruned(folder, type(like))
    return type(like).from_pretrained(str(folder)).eval()


def export_hf_folder(
    model: nn.Module, batches: list, final: Path, tokenizer: Any, description: dict | None
) -> tuple[list[Tensor], Path, str]:
    """``save_pretrained`` + tokenizer into a staged folder, reloaded and run on ``batches``, then renamed.

    Returns the reloaded model's logits per batch, the folder, and how it was checked.

    Example:
        >>> outputs, folder, runtime = export_hf_folder(student, [batch], Path("export/student-hf"), None, {})
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = save_hf_folder(model, final, tokenizer=tokenizer, description=description)
    try:
        fresh = load_hf_folder(staging, like=model)
        outputs = [reference_outputs(fresh, batch) for batch in batches]
        check_finite(outputs, "safetensors", final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    runtime = f"{type(model).__name__}.from_pretrained (transformers)"
    return outputs, replace_folder(staging, final), runtime
