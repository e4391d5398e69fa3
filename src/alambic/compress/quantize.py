"""Post-training int8 quantization with ONNX Runtime's quantizer, and ONNX Runtime evaluation and timing.

Two flows, both on an ONNX file written by :func:`alambic.compress.export.export_onnx`:

- **dynamic** (:func:`quantize_onnx_dynamic`): int8 weights of MatMul / Gemm (Linear), LSTM, GRU and
  Attention; activations are quantized on the fly per batch. No calibration data. Made for Linear-heavy
  models (MLPs, Transformers, RNNs); convolutions stay slow this way.
- **static** (:func:`quantize_onnx_static`): int8 weights (per output channel) and activations whose
  ranges are calibrated on a few hundred training samples, in QDQ format; onnxruntime fuses the
  QuantizeLinear / DequantizeLinear pairs into integer kernels (QLinearConv, QLinearMatMul).

Activations default to uint8 with int8 weights (U8S8): ONNX Runtime's documentation recommends it for
x86-64 CPUs with AVX2 / AVX-512, where S8S8 kernels are slower (on this project's AVX2 machine S8S8 QDQ
ResNet-20 ran slower than float32, U8S8 1.7x faster). On CPUs without VNNI the U8S8 multiply can
saturate; ``reduce_range=True`` (7-bit weights) avoids it at some accuracy cost.
See https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html.

PyTorch's eager quantization (``torch.ao.quantization``) is deprecated; its successor lives in torchao,
which this module does not need. onnx and onnxruntime are imported inside the functions.

Example:
    >>> quantize_onnx_static("student.onnx", "student-int8.onnx", train_images[:256])
    >>> evaluate_onnx("student-int8.onnx", test_set, num_classes=10)["accuracy"]
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alambic.compress.export import onnx_feed, onnx_session, run_onnx
from alambic.compress.parity import max_diff, prediction_agreement
from alambic.core.batches import stack_inputs
from alambic.core.evaluate import classification_metrics, repeat_batch
from alambic.errors import ConfigError
from alambic.imports import require

QUANTIZE_METHODS = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _preprocess(source: Path, directory: str) -> str:
    """Shape inference and graph optimisation before quantizing, as onnxruntime recommends."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # absolute before the chdir below: relative paths (``runs/NAME/...``) would point elsewhere after it
    directory, source = os.path.abspath(directory), os.path.abspath(source)
    processed = os.path.join(directory, "preprocessed.onnx")
    here = os.getcwd()
    os.chdir(directory)  # its symbolic shape inference writes temporary files into the working folder
    try:
        try:
            quant_pre_process(source, processed)
        except Exception:  # noqa: BLE001 - onnxruntime raises plain Exceptions
            # Transformers with dynamic batch and sequence axes stop its symbolic shape inference
            # ("Incomplete symbolic shape inference"); ONNX shape inference and optimisation still run.
            quant_pre_process(source, processed, skip_symbolic_shape=True)
    finally:
        os.chdir(here)
    return processed


def _quantize_into(out: str | Path, source: str | Path, quantize: Any) -> Path:
    """Pre-process ``source`` in a scratch folder, ``quantize(preprocessed, temporary)``, then move it to ``out``.

    The output appears only when quantization succeeded; nothing half-written is left at ``out``.
    """
    out = Path(out)
    scratch = out.parent if out.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="alambic-quantize-", dir=scratch) as directory:
        temporary = os.path.join(directory, "quantized.onnx")
        quantize(_preprocess(Path(source), directory), temporary)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, out)
    return out


def quantize_onnx_dynamic(source: str | Path, out: str | Path, *, per_channel: bool = False) -> Path:
    """Dynamic int8 quantization of an ONNX model's Linear / LSTM weights (onnxruntime ``quantize_dynamic``).

    Example:
        >>> quantize_onnx_dynamic("student.onnx", "student-int8.onnx")
    """
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return _quantize_into(
        out,
        source,
        lambda preprocessed, temporary: quantize_dynamic(
            preprocessed, temporary, weight_type=QuantType.QInt8, per_channel=per_channel
        ),
    )


def quantize_onnx_static(
    source: str | Path,
    out: str | Path,
    calibration_inputs: Tensor,
    *,
    batch_size: int = 32,
    per_channel: bool = True,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    reduce_range: bool = False,
) -> Path:
    """Static int8 quantization (QDQ) with activation ranges calibrated on ``calibration_inputs``.

    Args:
        source: The float ONNX model.
        out: The int8 ONNX file to write.
        calibration_inputs: Real training inputs ``[N, ...]`` (a few hundred are enough).
        batch_size: Calibration batch size.
        per_channel: One weight scale per output channel (better accuracy, same speed).
        activation_type: ``uint8`` (U8S8, fast on x86 AVX2 / AVX-512) or ``int8`` (S8S8).
        calibrate_method: ``minmax``, ``entropy`` or ``percentile``.
        reduce_range: 7-bit weights, for CPUs without VNNI where U8S8 products can saturate.

    Example:
        >>> quantize_onnx_static("student.onnx", "student-int8.onnx", train_images[:256])
    """
    onnxruntime = require("onnxruntime", "onnx")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if activation_type not in ("uint8", "int8"):
        raise ConfigError(f"activation_type must be uint8 or int8, got {activation_type!r}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibrate_method must be one of {', '.join(CALIBRATION_METHODS)}, got {calibrate_method!r}"
        )
    if isinstance(calibration_inputs, dict):
        raise ConfigError(
            "static int8 calibrates one input tensor; for a model on tokenized text (a Transformer) use "
            "dynamic int8: --set compress.quantize.method=dynamic"
        )
    if len(calibration_inputs) == 0:
        raise ConfigError("static quantization needs calibration inputs (a few hundred training samples)")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    input_name = (
        onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    )

    class CalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            batches = calibration_inputs.detach().float().cpu().split(batch_size)  # [b, ...] each
            self.batches = iter([{input_name: batch.numpy()} for batch in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return _quantize_into(
        out,
        source,
        lambda preprocessed, temporary: quantize_static(
            preprocessed,
            temporary,
            CalibrationReader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
            calibrate_method=methods[calibrate_method],
        ),
    )


def quantize_onnx(
    source: str | Path,
    out: str | Path,
    *,
    method: str = "static",
    calibration_inputs: Tensor | None = None,
    **options: Any,
) -> Path:
    """``dynamic`` or ``static`` int8 quantization of an ONNX file (options go to the chosen function)."""
    if method == "dynamic":
        return quantize_onnx_dynamic(source, out, **options)
    if method == "static":
        if calibration_inputs is None:
            raise ConfigError("static quantization needs calibration_inputs (a few hundred training samples)")
        return quantize_onnx_static(source, out, calibration_inputs, **options)
    raise ConfigError(f"quantization method must be one of {', '.join(QUANTIZE_METHODS)}, got {method!r}")


def evaluate_onnx(
    path: str | Path, dataset: Any, *, num_classes: int, batch_size: int = 256, limit: int | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1 and cross-entropy of an ONNX classifier in onnxruntime on a data set.

    Args:
        path: The ONNX file (input: a batch of the data set's inputs; output: logits).
        dataset: Yields ``(input, label)``.
        num_classes: Number of classes.
        batch_size: Batch size of the runs.
        limit: Only the first ``limit`` samples (None: all).

    Example:
        >>> evaluate_onnx("student-int8.onnx", test_set, num_classes=10)["accuracy"]
    """
    session = onnx_session(path, threads=None)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    logits, labels = [], []
    for start in range(0, count, batch_size):
        samples = [dataset[index] for index in range(start, min(start + batch_size, count))]
        inputs = stack_inputs(samples)  # [b, ...], or {key: [b, T]} for tokenized text
        logits.append(run_onnx(session, inputs).float())
        labels.append(torch.tensor([int(sample[1]) for sample in samples]))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    metrics = classification_metrics(all_logits, all_labels, num_classes)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(all_logits, all_labels))
    return metrics


def onnx_latency(
    path: str | Path,
    example: Tensor | dict[str, Tensor],
    *,
    batch_size: int,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Median wall-clock milliseconds of one onnxruntime run on a batch (the first sample repeated).

    The same protocol as :func:`alambic.core.evaluate.measure_latency`: ``warmup`` untimed runs, then
    ``repeats`` timed ones; ``threads`` intra-op threads (one by default, as an edge core).
    """
    import time

    session = onnx_session(path, threads=threads)
    feed = onnx_feed(session, repeat_batch(example, batch_size))
    for _ in range(warmup):
        session.run(None, feed)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        timings.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(timings),
        "repeats": repeats,
        "batch_size": batch_size,
        "threads": threads,
    }


def onnx_profile(
    path: str | Path,
    example: Tensor | dict[str, Tensor],
    *,
    batch_sizes: tuple[int, ...] = (1, 64),
    repeats: int = 20,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Size of the ONNX file and its onnxruntime median latency per batch size.

    Example:
        >>> onnx_profile("student-int8.onnx", torch.randn(1, 1, 28, 28))["latency_ms"]["1"]
    """
    latency = {
        str(size): onnx_latency(path, example, batch_size=size, repeats=repeats, threads=threads)["median_ms"]
        for size in batch_sizes
    }
    return {"size_bytes": os.path.getsize(path), "latency_ms": latency, "latency_threads": threads}


def onnx_parity(
    path_a: str | Path, path_b: str | Path, inputs: Tensor | dict[str, Tensor]
) -> dict[str, float]:
    """Two ONNX models' outputs on ``inputs`` (int8 against float): ``max_abs_diff`` and
    ``prediction_agreement`` (the fraction of argmax predictions that match)."""
    first = run_onnx(onnx_session(path_a), inputs).float()
    second = run_onnx(onnx_session(path_b), inputs)
    return {
        "max_abs_diff": max_diff(first, second),
        "prediction_agreement": prediction_agreement([first], [second]),
    }
