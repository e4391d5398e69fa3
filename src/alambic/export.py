"""Export a student for deployment (ONNX, a ``torch.export`` program, safetensors) and check each export.

Every export is run in its own runtime on real inputs and compared with the PyTorch model: ONNX in
onnxruntime, the ``torch.export`` program after ``torch.export.load``, safetensors after loading the file
into a fresh copy of the model. The largest absolute difference of the logits is reported.

Only the student is exported: it is rebuilt from the run's ``config.yaml`` and filled from
``student/model.safetensors`` (or a training checkpoint, whose connectors and learned losses are dropped),
so neither the teacher nor the connectors can reach the file. Inputs are what the data set yields: images
normalised by the data set's mean and std (the export does not normalise).

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
import json
import logging
import math
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
        from alambic.pipeline import build_run_datasets, check_run_dir

        config = load_config(check_run_dir(source) / "config.yaml")
        if model not in RUN_MODELS:
            raise ConfigError(f"--model must be one of {', '.join(RUN_MODELS)}, got {model!r}")
        weights = source / RUN_MODELS[model] / "model.safetensors"
        if not weights.is_file():
            raise AlambicError(f"{weights} does not exist; has the run's {model} stage finished?")
        model_config = config.teacher.model if model == "teacher" else config.student.model
        model_config = model_config.model_copy(update={"checkpoint": None})
        train_set, test_set, info = build_run_datasets(config, data_dir=data_dir, augment=False, subset=False)
    elif source.is_file():
        if arch is None or dataset is None:
            raise AlambicError(
                f"{source} is a checkpoint: give --arch and --dataset (or pass a run directory)"
            )
        weights = source
        model_config = ModelConfig(arch=arch, kwargs=kwargs or {})
        train_set, test_set, info = build_datasets(dataset, data_dir=data_dir)
    else:
        raise AlambicError(f"{source} does not exist; pass a run directory or a .safetensors checkpoint")
    if weights.suffix != ".safetensors":
        raise AlambicError(f"{weights}: export reads safetensors weights; convert it with alambic first")
    built = build_named_model(model_config, info)
    load_resized(built, _student_state_dict(weights))
    description = {"arch": model_config.arch, "kwargs": model_config.kwargs, "weights": str(weights)}
    return LoadedModel(built.eval(), info, train_set, test_set, description)


def real_inputs(dataset: Any, count: int) -> Tensor:
    """The first ``count`` inputs of a data set as one batch ``[count, ...]`` (evenly spread over it)."""
    count = min(count, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    samples = [dataset[index] for index in indices]
    if isinstance(samples[0], Mapping) or isinstance(samples[0][0], Mapping):
        raise AlambicError("export handles models with one tensor input; this data set yields dicts")
    return torch.stack([torch.as_tensor(sample[0]) for sample in samples])  # [count, ...]


def _batched_example(inputs: Tensor) -> Tensor:
    # torch.export specialises a dimension whose example size is 0 or 1: trace with a batch of 2
    return inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, *([1] * (inputs.ndim - 1)))


@torch.no_grad()
def _reference(model: nn.Module, inputs: Tensor) -> Tensor:
    return model.eval()(inputs).float()  # [N, C]


def _max_diff(reference: Tensor, other: Any) -> float:
    other = torch.as_tensor(other).float()
    if other.shape != reference.shape:
        raise AlambicError(
            f"the export returned shape {tuple(other.shape)}, PyTorch {tuple(reference.shape)}"
        )
    return float((other - reference).abs().max())


def export_onnx(model: nn.Module, example: Tensor, path: str | Path, *, opset: int | None = None) -> Path:
    """Write ``model`` as one ONNX file with input ``input`` and output ``logits``, batch dynamic.

    Example:
        >>> export_onnx(student, torch.randn(2, 1, 28, 28), "student.onnx")
    """
    require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    batch = torch.export.Dim("batch")
    # without torchvision the exporter logs a warning per torchvision operator it skips
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        program = torch.onnx.export(
            model.eval(),
            (_batched_example(example),),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
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


def run_onnx(session: Any, inputs: Tensor) -> Tensor:
    """Logits of an onnxruntime session for a batch of inputs."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: inputs.detach().cpu().numpy()})[0])


def export_torch_program(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Save a ``torch.export`` program (``.pt2``) with a dynamic batch; load it with ``torch.export.load``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(
        model.eval(), (_batched_example(example),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    torch.export.save(program, str(temporary))
    os.replace(temporary, path)
    return path


def export_safetensors(model: nn.Module, path: str | Path, *, description: dict | None = None) -> Path:
    """Save the model's weights (and a JSON description in the header metadata) as safetensors."""
    from alambic.checkpoint import save_weights

    metadata = {"alambic": json.dumps(description or {}, sort_keys=True)}
    save_weights(model, path, metadata=metadata)
    return Path(path)


def export_model(
    model: nn.Module,
    inputs: Tensor,
    path: str | Path,
    *,
    export_format: str = "onnx",
    description: dict | None = None,
    opset: int | None = None,
) -> dict[str, Any]:
    """Export ``model`` and check the export in its runtime on ``inputs``: the max absolute difference.

    Args:
        model: The model (a plain module: no teacher, no connectors).
        inputs: Real inputs ``[N, ...]``; the check runs them as one batch and the first alone (the
            batch dimension is dynamic).
        path: The file to write.
        export_format: ``onnx``, ``torch-export`` or ``safetensors``.
        description: Stored in a safetensors file's metadata (architecture and kwargs).
        opset: ONNX opset (default: the exporter's).

    Returns:
        ``{"format", "path", "size_bytes", "max_abs_diff", "checked_samples", "runtime"}``.

    Example:
        >>> export_model(student, test_images[:64], "student.onnx")["max_abs_diff"]
    """
    if export_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    model = model.eval()
    reference = _reference(model, inputs)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name and renamed once checked: a failed export leaves no file behind
    path = final.with_name(f".{final.stem}.partial{final.suffix}")
    try:
        if export_format == "onnx":
            export_onnx(model, inputs, path, opset=opset)
            session = onnx_session(path)
            outputs = [run_onnx(session, inputs), run_onnx(session, inputs[:1])]
            runtime = f"onnxruntime {require('onnxruntime').__version__}"
        elif export_format == "torch-export":
            export_torch_program(model, inputs, path)
            loaded = torch.export.load(str(path)).module()
            with torch.no_grad():
                outputs = [loaded(inputs), loaded(inputs[:1])]
            runtime = f"torch.export.load (torch {torch.__version__})"
        else:
            export_safetensors(model, path, description=description)
            fresh = copy.deepcopy(model)
            load_resized(fresh, _student_state_dict(Path(path)))
            outputs = [_reference(fresh, inputs), _reference(fresh, inputs[:1])]
            runtime = "safetensors into a fresh copy of the model"
        diff = max(_max_diff(reference, outputs[0]), _max_diff(reference[:1], outputs[1]))
        if not math.isfinite(diff):
            raise AlambicError(f"the {export_format} export of {final} gives non-finite outputs")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    os.replace(path, final)
    path = final
    return {
        "format": export_format,
        "path": str(path),
        "size_bytes": os.path.getsize(path),
        "max_abs_diff": diff,
        "checked_samples": len(inputs),
        "runtime": runtime,
    }


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
    ``.safetensors``); for a checkpoint, next to it.

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
        out = folder / f"{stem}{SUFFIXES[export_format]}"
    inputs = real_inputs(loaded.test_set, check_samples)
    description = {**loaded.description, "input_shape": list(loaded.info.input_shape)}
    description["num_classes"] = loaded.info.num_classes
    report = export_model(loaded.model, inputs, out, export_format=export_format, description=description)
    report["parameters"] = sum(parameter.numel() for parameter in loaded.model.parameters())
    report["model"] = model
    return report
