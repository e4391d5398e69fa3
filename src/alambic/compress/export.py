"""Export a student for deployment (ONNX, a ``torch.export`` program, safetensors) and check each export.

Every export is run in its own runtime on real inputs and compared with the PyTorch model: ONNX in
onnxruntime, the ``torch.export`` program after ``torch.export.load``, safetensors after loading the file
into a fresh copy of the model. The largest absolute difference of the logits is reported.

A run's student reaches these functions rebuilt from its ``config.yaml`` by
:func:`alambic.run.artifacts.export_run` (what ``alambic export`` calls), so neither the teacher nor
the connectors can reach the file. Inputs are what the data set yields: images
normalised by the data set's mean and std (the export does not normalise), or the tokenized dict of a text
data set, for a Hugging Face student (one input per key, dynamic batch and sequence length, output
``logits``; its safetensors export is a ``save_pretrained`` folder with the tokenizer; see
:mod:`alambic.compress.export_hf`).

ONNX export uses PyTorch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, the
default since PyTorch 2.9; it needs ``onnxscript``), with a dynamic batch dimension and the weights inside
the ``.onnx`` file. onnx, onnxscript and onnxruntime are imported inside the functions that need them
(``pip install alambic[onnx]``).

Example:
    >>> report = export_model(student, real_inputs(test_set, 64), "student.onnx", export_format="onnx")
    >>> report["max_abs_diff"] < 1e-4
    True
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from alambic.compress.export_hf import export_hf_folder, input_names, is_hf_model, shorter_sample, traceable
from alambic.compress.parity import check_finite, max_diff, prediction_agreement, reference_outputs
from alambic.core.batches import Inputs, batch_size_of
from alambic.core.checkpoint import save_weights
from alambic.errors import ConfigError
from alambic.files import dumps_json
from alambic.imports import require
from alambic.models.surgery import load_resized

FORMATS = ("onnx", "torch-export", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}


def _batched_example(inputs: Inputs) -> Inputs:
    # torch.export specialises a dimension whose example size is 0 or 1: trace with a batch of 2
    if isinstance(inputs, Mapping):
        return {key: _batched_example(value) for key, value in inputs.items()}
    return inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, *([1] * (inputs.ndim - 1)))


def _check_batches(inputs: Inputs) -> list[Inputs]:
    """The batches an export is checked on: all inputs, then one sample (cut to its real tokens for text)."""
    if isinstance(inputs, Mapping):
        return [inputs, shorter_sample(inputs)]
    return [inputs, inputs[:1]]


def export_onnx(model: nn.Module, example: Inputs, path: str | Path, *, opset: int | None = None) -> Path:
    """Write ``model`` as one ONNX file with input ``input`` and output ``logits``, batch dynamic.

    A dict example (tokenized text) gives one input per key the model takes (``input_ids``,
    ``attention_mask``, ``token_type_ids``), each with dynamic batch and sequence dimensions.

    Example:
        >>> export_onnx(student, torch.randn(2, 1, 28, 28), "student.onnx")
    """
    require("onnxscript", "onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    module, arguments, names, shapes = traceable(model.eval(), _batched_example(example))
    # without torchvision the exporter logs a warning per torchvision operator it skips
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        program = torch.onnx.export(
            module,
            arguments,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        program.save(str(temporary), external_data=False)  # weights inside the one file
    os.replace(temporary, path)
    return path


def onnx_session(path: str | Path, *, threads: int | None = 1) -> Any:
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads (None: runtime default)."""
    onnxruntime = require("onnxruntime", "onnx")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_feed(session: Any, inputs: Inputs) -> dict[str, Any]:
    """The numpy feed of a session: its one input, or each of its inputs by name from a dict."""
    if isinstance(inputs, Mapping):
        return {i.name: inputs[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    return {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}


def run_onnx(session: Any, inputs: Inputs) -> Tensor:
    """Logits of an onnxruntime session for a batch of inputs (a tensor, or a dict of token tensors)."""
    return torch.from_numpy(session.run(None, onnx_feed(session, inputs))[0])


def export_torch_program(model: nn.Module, example: Inputs, path: str | Path) -> Path:
    """Save a ``torch.export`` program (``.pt2``) with a dynamic batch; load it with ``torch.export.load``.

    A dict example gives a program taking the model's token tensors positionally (see
    :func:`alambic.compress.export_hf.input_names` for their order), with dynamic batch and sequence length.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module, arguments, _names, shapes = traceable(model.eval(), _batched_example(example))
    program = torch.export.export(module, arguments, dynamic_shapes=shapes)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    torch.export.save(program, str(temporary))
    os.replace(temporary, path)
    return path


def export_safetensors(model: nn.Module, path: str | Path, *, description: dict | None = None) -> Path:
    """Save the model's weights (and a JSON description in the header metadata) as safetensors."""
    metadata = {"alambic": dumps_json(description or {}, sort_keys=True)}
    save_weights(model, path, metadata=metadata)
    return Path(path)


def export_model(
    model: nn.Module,
    inputs: Inputs,
    path: str | Path,
    *,
    export_format: str = "onnx",
    description: dict | None = None,
    opset: int | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Export ``model`` and check the export in its runtime on ``inputs``: the max absolute difference.

    Args:
        model: The model (a plain module: no teacher, no connectors).
        inputs: Real inputs ``[N, ...]``, or a dict of token tensors ``{key: [N, T]}``; the check runs
            them as one batch and the first alone (cut to its real tokens for text: the batch and
            sequence dimensions are dynamic).
        path: The file to write; for the safetensors export of a Hugging Face model, the folder.
        export_format: ``onnx``, ``torch-export`` or ``safetensors``.
        description: Stored in a safetensors file's metadata (architecture and kwargs), or in
            ``alambic.json`` of a Hugging Face folder.
        opset: ONNX opset (default: the exporter's).
        tokenizer: Saved into a Hugging Face folder (an object, or a folder / hub id to load it from).

    Returns:
        ``{"format", "path", "size_bytes", "max_abs_diff", "prediction_agreement", "checked_samples",
        "runtime", "inputs"}``; ``prediction_agreement`` is the fraction of argmax predictions that match.

    Example:
        >>> export_model(student, test_images[:64], "student.onnx")["max_abs_diff"]
    """
    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    model = model.eval()
    batches = _check_batches(inputs)
    references = [reference_outputs(model, batch) for batch in batches]
    names = input_names(model, inputs) if isinstance(inputs, Mapping) else ["input"]
    if export_format == "safetensors" and is_hf_model(model):
        outputs, final, runtime = export_hf_folder(model, batches, Path(path), tokenizer, description)
        size = sum(file.stat().st_size for file in final.rglob("*") if file.is_file())
    else:
        outputs, final, runtime = _export_file(
            model, inputs, batches, Path(path), export_format, description, opset
        )
        size = os.path.getsize(final)
    diff = max(max_diff(reference, output) for reference, output in zip(references, outputs))
    return {
        "format": export_format,
        "path": str(final),
        "size_bytes": size,
        "max_abs_diff": diff,
        "prediction_agreement": prediction_agreement(references, outputs),
        "checked_samples": batch_size_of(inputs),
        "runtime": runtime,
        "inputs": names,
    }


def _export_file(
    model: nn.Module,
    inputs: Inputs,
    batches: list[Inputs],
    final: Path,
    export_format: str,
    description: dict | None,
    opset: int | None,
) -> tuple[list[Tensor], Path, str]:
    """Write one export file under a temporary name, run it on ``batches``, and rename it once checked."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name and renamed once checked: a failed export leaves no file behind
    path = final.with_name(f".{final.stem}.partial{final.suffix}")
    try:
        if export_format == "onnx":
            export_onnx(model, inputs, path, opset=opset)
            session = onnx_session(path)
            outputs = [run_onnx(session, batch) for batch in batches]
            runtime = f"onnxruntime {require('onnxruntime', 'onnx').__version__}"
        elif export_format == "torch-export":
            export_torch_program(model, inputs, path)
            loaded = torch.export.load(str(path)).module()
            names = input_names(model, inputs) if isinstance(inputs, Mapping) else None
            with torch.no_grad():
                outputs = [
                    loaded(*(batch[name] for name in names)) if names else loaded(batch) for batch in batches
                ]
            runtime = f"torch.export.load (torch {torch.__version__})"
        else:
            export_safetensors(model, path, description=description)
            fresh = copy.deepcopy(model)
            load_resized(fresh, load_file(str(path)))
            outputs = [reference_outputs(fresh, batch) for batch in batches]
            runtime = "safetensors into a fresh copy of the model"
        check_finite(outputs, export_format, final)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    os.replace(path, final)
    return outputs, final, runtime


def default_export_path(folder: Path, stem: str, export_format: str, model: nn.Module) -> Path:
    """``folder/STEM.onnx`` (``.pt2``, ``.safetensors``), or the folder ``STEM-hf`` for a Hugging Face
    model's safetensors export."""
    if export_format == "safetensors" and is_hf_model(model):
        return folder / f"{stem}-hf"
    return folder / f"{stem}{SUFFIXES[export_format]}"
