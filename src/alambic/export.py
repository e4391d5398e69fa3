"""Export a student for deployment (ONNX, a ``torch.export`` program, safetensors) and check each export.

Every export is run in its own runtime on real inputs and compared with the PyTorch model: ONNX in
onnxruntime, the ``torch.export`` program after ``torch.export.load``, safetensors after loading the file
into a fresh copy of the model. The largest absolute difference of the logits is reported.

Only the student is exported: it is rebuilt from the run's ``config.yaml`` and filled from
``student/model.safetensors`` (or a training checkpoint, whose connectors and learned losses are dropped),
so neither the teacher nor the connectors can reach the file. Inputs are what the data set yields: images
normalised by the data set's mean and std (the export does not normalise), or the tokenized dict of a text
data set, for a Hugging Face student (one input per key, dynamic batch and sequence length, output
``logits``; its safetensors export is a ``save_pretrained`` folder with the tokenizer; see
:mod:`alambic.export_hf`).

ONNX export uses PyTorch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, the
default since PyTorch 2.9; it needs ``onnxscript``), with a dynamic batch dimension and the weights inside
the ``.onnx`` file. onnx, onnxscript and onnxruntime are imported inside the functions that need them
(``pip install alambic[onnx]``).

Example:
    >>> report = export_run("runs/mnist-demo", "student.onnx", export_format="onnx")
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.errors import AlambicError, ConfigError
from alambic.files import dumps_json

FORMATS = ("onnx", "torch-export", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
RUN_MODELS = {"student": "student", "distilled": "student", "baseline": "baseline", "teacher": "teacher"}


def require(module: str, extra: str = "onnx") -> Any:
    """Import an optional dependency, or raise a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise AlambicError(
            f"{module} is not installed; install it with pip install 'alambic[{extra}]'"
        ) from None


@dataclass
class LoadedModel:
    """A model rebuilt for export, with the data it is checked on."""

    model: nn.Module
    info: Any  # DatasetInfo
    train_set: Any
    test_set: Any
    description: dict
    tokenizer: str | None = None  # a text run's tokenizer (folder or hub id), saved with an HF export


def _student_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights of a saved model; a training checkpoint's connectors and learned losses are dropped."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if any(key.startswith("student.") for key in state):  # a Distiller checkpoint: student + connectors
        state = {
            key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")
        }
    return state


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
    from alambic.heads import sync_attention_heads

    sync_attention_heads(model)  # a head-pruned Transformer: head counts follow the resized Linears
    return model


def load_run_model(
    source: str | Path,
    *,
    model: str = "student",
    data_dir: str | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    kwargs: dict | None = None,
) -> LoadedModel:
    """Rebuild a saved model and its data: a run directory's ``model``, or a checkpoint with ``arch``.

    Args:
        source: A run directory written by ``alambic run``, or a ``.safetensors`` checkpoint.
        model: For a run directory: ``student`` (the distilled one), ``baseline`` or ``teacher``.
        data_dir: Overrides the run's ``data.data_dir`` (or the checkpoint's data folder).
        arch: For a checkpoint: zoo name or ``package.module:function``.
        dataset: For a checkpoint: the data set whose test split checks the export.
        kwargs: For a checkpoint: the model's arguments.

    Example:
        >>> loaded = load_run_model("runs/mnist-demo")
        >>> loaded.model
    """
    from alambic.config import ModelConfig, load_config
    from alambic.data import build_datasets
    from alambic.pipeline import build_named_model

    source = Path(source)
    if source.is_dir():
        from alambic.pipeline import build_run_datasets, check_run_dir, run_tokenizer

        config = load_config(check_run_dir(source) / "config.yaml")
        if model not in RUN_MODELS:
            raise ConfigError(f"--model must be one of {', '.join(RUN_MODELS)}, got {model!r}")
        weights = source / RUN_MODELS[model] / "model.safetensors"
        if not weights.is_file():
            raise AlambicError(f"{weights} does not exist; has the run's {model} stage finished?")
        model_config = config.teacher.model if model == "teacher" else config.student.model
        model_config = model_config.model_copy(update={"checkpoint": None})
        train_set, test_set, info = build_run_datasets(config, data_dir=data_dir, augment=False, subset=False)
        built = build_run_architecture(config, model, info)
        tokenizer = run_tokenizer(config)
    elif source.is_file():
        if arch is None or dataset is None:
            raise AlambicError(
                f"{source} is a checkpoint: give --arch and --dataset (or pass a run directory)"
            )
        weights = source
        model_config = ModelConfig(arch=arch, kwargs=kwargs or {})
        train_set, test_set, info = build_datasets(dataset, data_dir=data_dir)
        built, tokenizer = build_named_model(model_config, info), None
    else:
        raise AlambicError(f"{source} does not exist; pass a run directory or a .safetensors checkpoint")
    if weights.suffix != ".safetensors":
        raise AlambicError(f"{weights}: export reads safetensors weights; convert it with alambic first")
    load_resized(built, _student_state_dict(weights))
    description = {"arch": model_config.arch, "kwargs": model_config.kwargs, "weights": str(weights)}
    return LoadedModel(built.eval(), info, train_set, test_set, description, tokenizer)


def build_run_architecture(config: Any, model: str, info: Any) -> nn.Module:
    """A run's ``student`` (also ``distilled`` / ``baseline``) or ``teacher`` architecture, before its weights.

    A ``derive:teacher`` student is derived from the teacher's architecture (its weights are then
    replaced by the run's), so the teacher's ``hf:`` folder or hub id must still be reachable.

    Example:
        >>> student = build_run_architecture(load_config("runs/sst2/config.yaml"), "student", info)
    """
    from alambic.export_hf import quiet_transformers
    from alambic.pipeline import build_named_model, derive_from_teacher

    with quiet_transformers():
        if model == "teacher":
            return build_named_model(config.teacher.model.model_copy(update={"checkpoint": None}), info)
        student = config.student.model.model_copy(update={"checkpoint": None})
        if student.arch == "derive:teacher":
            teacher = build_named_model(config.teacher.model.model_copy(update={"checkpoint": None}), info)
            return derive_from_teacher(teacher, student)
        return build_named_model(student, info)


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


def _batched_example(inputs: Inputs) -> Inputs:
    # torch.export specialises a dimension whose example size is 0 or 1: trace with a batch of 2
    if isinstance(inputs, Mapping):
        return {key: _batched_example(value) for key, value in inputs.items()}
    return inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, *([1] * (inputs.ndim - 1)))


def _check_batches(inputs: Inputs) -> list[Inputs]:
    """The batches an export is checked on: all inputs, then one sample (cut to its real tokens for text)."""
    if isinstance(inputs, Mapping):
        from alambic.export_hf import shorter_sample

        return [inputs, shorter_sample(inputs)]
    return [inputs, inputs[:1]]


@torch.no_grad()
def _reference(model: nn.Module, inputs: Inputs) -> Tensor:
    from alambic.batches import call_model, logits_of

    return logits_of(call_model(model.eval(), inputs)).float()  # [N, C]


def _max_diff(reference: Tensor, other: Any) -> float:
    other = torch.as_tensor(other).float()
    if other.shape != reference.shape:
        raise AlambicError(
            f"the export returned shape {tuple(other.shape)}, PyTorch {tuple(reference.shape)}"
        )
    return float((other - reference).abs().max())


def export_onnx(model: nn.Module, example: Inputs, path: str | Path, *, opset: int | None = None) -> Path:
    """Write ``model`` as one ONNX file with input ``input`` and output ``logits``, batch dynamic.

    A dict example (tokenized text) gives one input per key the model takes (``input_ids``,
    ``attention_mask``, ``token_type_ids``), each with dynamic batch and sequence dimensions.

    Example:
        >>> export_onnx(student, torch.randn(2, 1, 28, 28), "student.onnx")
    """
    from alambic.export_hf import traceable

    require("onnxscript")
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
    onnxruntime = require("onnxruntime")
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
    :func:`alambic.export_hf.input_names` for their order), with dynamic batch and sequence length.
    """
    from alambic.export_hf import traceable

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
    from alambic.checkpoint import save_weights

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
        ``{"format", "path", "size_bytes", "max_abs_diff", "checked_samples", "runtime", "inputs"}``.

    Example:
        >>> export_model(student, test_images[:64], "student.onnx")["max_abs_diff"]
    """
    from alambic.export_hf import export_hf_folder, input_names, is_hf_model

    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    model = model.eval()
    batches = _check_batches(inputs)
    references = [_reference(model, batch) for batch in batches]
    names = input_names(model, inputs) if isinstance(inputs, Mapping) else ["input"]
    if export_format == "safetensors" and is_hf_model(model):
        outputs, final, runtime = export_hf_folder(model, batches, Path(path), tokenizer, description)
        size = sum(file.stat().st_size for file in final.rglob("*") if file.is_file())
    else:
        outputs, final, runtime = _export_file(
            model, inputs, batches, Path(path), export_format, description, opset
        )
        size = os.path.getsize(final)
    diff = max(_max_diff(reference, output) for reference, output in zip(references, outputs))
    return {
        "format": export_format,
        "path": str(final),
        "size_bytes": size,
        "max_abs_diff": diff,
        "checked_samples": batch_size_of(inputs),
        "runtime": runtime,
        "inputs": names,
    }


def _check_finite(outputs: list[Tensor], export_format: str, final: Path) -> None:
    if not all(bool(torch.isfinite(torch.as_tensor(output)).all()) for output in outputs):
        raise AlambicError(f"the {export_format} export of {final} gives non-finite outputs")


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
    from alambic.export_hf import input_names

    final.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name and renamed once checked: a failed export leaves no file behind
    path = final.with_name(f".{final.stem}.partial{final.suffix}")
    try:
        if export_format == "onnx":
            export_onnx(model, inputs, path, opset=opset)
            session = onnx_session(path)
            outputs = [run_onnx(session, batch) for batch in batches]
            runtime = f"onnxruntime {require('onnxruntime').__version__}"
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
            load_resized(fresh, _student_state_dict(Path(path)))
            outputs = [_reference(fresh, batch) for batch in batches]
            runtime = "safetensors into a fresh copy of the model"
        _check_finite(outputs, export_format, final)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    os.replace(path, final)
    return outputs, final, runtime


def default_export_path(folder: Path, stem: str, export_format: str, model: nn.Module) -> Path:
    """``folder/STEM.onnx`` (``.pt2``, ``.safetensors``), or the folder ``STEM-hf`` for a Hugging Face
    model's safetensors export."""
    from alambic.export_hf import is_hf_model

    if export_format == "safetensors" and is_hf_model(model):
        return folder / f"{stem}-hf"
    return folder / f"{stem}{SUFFIXES[export_format]}"


def export_run(
    source: str | Path,
    out: str | Path | None = None,
    *,
    export_format: str = "onnx",
    model: str = "student",
    data_dir: str | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    kwargs: dict | None = None,
    check_samples: int = 64,
) -> dict[str, Any]:
    """Export a run's student (or a checkpoint) and check it on ``check_samples`` real test inputs.

    What ``alambic export`` calls. ``out`` defaults to ``RUN_DIR/export/MODEL.onnx`` (or ``.pt2``,
    ``.safetensors``, or the folder ``MODEL-hf/`` for a Hugging Face model's safetensors); for a
    checkpoint, next to it. A text run's model is checked on tokenized test sentences.

    Example:
        >>> export_run("runs/mnist-demo", export_format="onnx")["max_abs_diff"]
    """
    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    loaded = load_run_model(source, model=model, data_dir=data_dir, arch=arch, dataset=dataset, kwargs=kwargs)
    source = Path(source)
    if out is None:
        folder = source / "export" if source.is_dir() else source.parent
        stem = model if source.is_dir() else source.stem
        out = default_export_path(folder, stem, export_format, loaded.model)
    inputs = real_inputs(loaded.test_set, check_samples)
    description = {**loaded.description, "input_shape": list(loaded.info.input_shape)}
    description["num_classes"] = loaded.info.num_classes
    report = export_model(
        loaded.model,
        inputs,
        out,
        export_format=export_format,
        description=description,
        tokenizer=loaded.tokenizer,
    )
    report["parameters"] = sum(parameter.numel() for parameter in loaded.model.parameters())
    report["model"] = model
    return report
