"""Classification metrics and model profiling: accuracy, macro-F1, parameters, size, FLOPs, latency.

Everything here works on a model and tensors; nothing reads a config. The numbers feed
``summary.json`` (see :mod:`alambic.run.report`), so each function documents exactly what it measures.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import Tensor, nn

from alambic.core.batches import call_model, logits_of, model_device, split_batch
from alambic.errors import AlambicError

ExampleInput = Tensor | Mapping[str, Tensor]


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Count (true class, predicted class) pairs.

    Args:
        predictions: Predicted class indices, shape ``[N]``.
        labels: True class indices, shape ``[N]``.
        num_classes: Number of classes ``C``.

    Returns:
        An int64 tensor ``[C, C]``: row = true class, column = predicted class.
    """
    flat_index = labels.long() * num_classes + predictions.long()  # [N]
    counts = torch.bincount(flat_index, minlength=num_classes * num_classes)  # [C*C]
    return counts.reshape(num_classes, num_classes)


def classification_metrics(predictions: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class accuracy from predicted and true class indices.

    Macro-F1 follows ``sklearn.metrics.f1_score(labels, predictions, average="macro")``: the
    classes averaged are those that occur in ``labels`` or in ``predictions``; a class absent
    from both has no defined F1 and is left out of the mean (sklearn does the same because it
    only looks at the labels it sees). Per class, ``F1 = 2 TP / (2 TP + FP + FN)``, so a class that
    occurs in the labels but is never predicted scores 0 (sklearn's ``zero_division`` default).

    Args:
        predictions: Predicted class indices ``[N]``, or logits ``[N, C]`` (argmax is taken).
        labels: True class indices ``[N]``.
        num_classes: Number of classes ``C``; every index must lie in ``[0, C)``.

    Returns:
        ``{"accuracy", "macro_f1", "per_class_accuracy", "num_samples", "errors"}``.
        ``per_class_accuracy[c]`` is the recall of class ``c`` (correct / occurrences in the
        labels), and ``nan`` for a class with no sample in ``labels``. With no samples at all,
        accuracy and macro-F1 are 0.

    Example:
        >>> classification_metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), num_classes=2)["accuracy"]
        0.6666666666666666
    """
    if predictions.ndim == 2:
        predictions = predictions.argmax(dim=-1)  # [N]
    predictions = predictions.detach().reshape(-1).cpu().long()
    labels = labels.detach().reshape(-1).cpu().long()
    if predictions.numel() != labels.numel():
        raise ValueError(
            f"got {predictions.numel()} predictions for {labels.numel()} labels; they must match"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise AlambicError(
                f"{name} contain class indices in [{int(values.min())}, {int(values.max())}] but "
                f"num_classes={num_classes} allows only [0, {num_classes - 1}]; set num_classes to "
                "the number of classes in the dataset"
            )

    matrix = confusion_matrix(predictions, labels, num_classes).double()  # [C, C]
    true_positives = matrix.diagonal()  # [C]
    support = matrix.sum(dim=1)  # [C] occurrences in labels
    predicted = matrix.sum(dim=0)  # [C] occurrences in predictions
    num_samples = int(labels.numel())
    correct = int(true_positives.sum())

    present = (support + predicted) > 0  # classes sklearn would average over
    f1_denominator = support + predicted  # = 2 TP + FP + FN
    f1 = torch.where(present, 2 * true_positives / f1_denominator.clamp(min=1), torch.zeros_like(support))
    macro_f1 = float(f1[present].mean()) if bool(present.any()) else 0.0
    per_class = torch.where(
        support > 0, true_positives / support.clamp(min=1), torch.full_like(support, float("nan"))
    )
    return {
        "accuracy": correct / num_samples if num_samples else 0.0,
        "macro_f1": macro_f1,
        "per_class_accuracy": [float(value) for value in per_class],
        "num_samples": num_samples,
        "errors": num_samples - correct,
    }


class EvalMode:
    """Context manager: eval mode inside, each submodule's own train/eval flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.previous = {module: module.training for module in model.modules()}

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc_info: object) -> None:
        for module, training in self.previous.items():
            module.training = training


def rows_of(loader: Any) -> int | None:
    """The rows a loader's data set holds (None when it has no length): an evaluation's total."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_classes: int,
    accelerator: Any = None,
    device: str | torch.device | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Run a classifier over a loader and compute its metrics and mean cross-entropy.

    The model runs in eval mode under ``torch.inference_mode()``; each submodule's previous
    train/eval mode is restored afterwards. With an ``accelerate.Accelerator``, the loader and
    model should come from ``accelerator.prepare``; predictions, labels and per-sample losses are
    collected with ``accelerator.gather_for_metrics``, so the metrics cover the whole set across
    processes and the samples duplicated to pad the last batch are dropped.

    Args:
        model: Maps inputs to logits ``[B, C]`` (a tensor, or an output with ``logits``).
        loader: Yields ``(inputs, labels)`` pairs, or dicts whose ``labels`` key holds the labels
            and whose other keys are passed to the model as keyword arguments.
        num_classes: Number of classes ``C``.
        accelerator: Optional ``accelerate.Accelerator``; batches go to ``accelerator.device``.
        device: Where to put the batches when no accelerator is given; the model is not moved
            and must already live there. Default: the device of the model's parameters.
        progress: Called before the first batch and after each with the samples evaluated so far and
            the loader's data set's length (None when it has none).

    Returns:
        :func:`classification_metrics` plus ``"loss"``: the mean cross-entropy over samples.

    Example:
        >>> metrics = evaluate_classifier(model, test_loader, num_classes=10)
        >>> print(f"{metrics['accuracy']:.2%}, {metrics['errors']} errors")
    """
    if accelerator is not None:
        target_device = accelerator.device
    else:
        target_device = torch.device(device) if device is not None else model_device(model)
    all_predictions: list[Tensor] = []
    all_labels: list[Tensor] = []
    all_losses: list[Tensor] = []
    all_probabilities: list[Tensor] = []
    total_rows = rows_of(loader) if progress is not None else None
    if progress is not None:
        progress(0, total_rows)
    with EvalMode(model), torch.inference_mode():
        for batch in loader:
            inputs, labels = split_batch(send_to_device(batch, target_device))
            if labels is None:
                raise AlambicError(
                    "evaluation batches need labels: yield (inputs, labels) or a dict with 'labels'"
                )
            logits = logits_of(call_model(model, inputs))  # [B, C]
            if logits.ndim != 2:
                raise AlambicError(
                    f"expected logits of shape [batch, num_classes], got {tuple(logits.shape)}; "
                    "evaluate_classifier scores one label per sample"
                )
            labels = labels.reshape(-1).long()  # [B]
            losses = F.cross_entropy(logits.float(), labels, reduction="none")  # [B]
            predictions = logits.argmax(dim=-1)  # [B]
            probabilities = logits.float().softmax(dim=-1)  # [B, C]
            if accelerator is not None:
                predictions, labels, losses, probabilities = accelerator.gather_for_metrics(
                    (predictions, labels, losses, probabilities)
                )
            all_predictions.append(predictions.cpu())
            all_labels.append(labels.cpu())
            all_losses.append(losses.float().cpu())
            all_probabilities.append(probabilities.cpu())
            if progress is not None:
                progress(sum(len(item) for item in all_labels), total_rows)
    if not all_labels:
        raise AlambicError("the evaluation loader yielded no batches; check the test split is not empty")
    labels = torch.cat(all_labels)
    metrics = classification_metrics(torch.cat(all_predictions), labels, num_classes)
    metrics["loss"] = float(torch.cat(all_losses).mean())
    metrics["roc_auc"] = roc_auc(torch.cat(all_probabilities), labels)
    return metrics


def roc_auc(probabilities: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve: of class 1's probability for two classes, else the macro average of
    one-vs-rest AUCs (``sklearn.metrics.roc_auc_score(..., multi_class="ovr", average="macro")``) over
    the classes that occur in ``labels`` (a class without samples has no AUC). None when fewer than two
    classes occur.

    Args:
        probabilities: ``[N, C]`` predicted class probabilities.
        labels: ``[N]`` true class indices.

    Example:
        >>> roc_auc(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1, 1]))
        1.0
    """
    from sklearn.metrics import roc_auc_score  # here: importing sklearn.metrics takes seconds

    labels = labels.reshape(-1).long().numpy()
    scores = probabilities.double().numpy()  # [N, C]
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        return None
    if not bool(torch.isfinite(probabilities).all()):  # a NaN input: the metric is not finite, and says so
        return float("nan")
    if scores.shape[1] == 2:
        return float(roc_auc_score(labels == 1, scores[:, 1]))
    return float(sum(roc_auc_score(labels == c, scores[:, c]) for c in present) / len(present))


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not); a parameter shared by two modules counts once."""
    return sum(parameter.numel() for parameter in model.parameters())


def size_on_disk(model: nn.Module) -> int:
    """Bytes taken by the model's ``state_dict`` saved with safetensors.

    The state dict is written to a temporary file with ``safetensors.torch.save_model`` (which
    stores tied weights once), measured, and deleted. The size therefore includes buffers
    (e.g. BatchNorm running statistics) and safetensors' small JSON header. A state dict that
    safetensors cannot store (for example dynamically quantized modules, whose packed weights
    are not plain tensors) is measured with ``torch.save`` instead, whose zip container adds a
    few kilobytes.

    Args:
        model: The model to measure.

    Returns:
        The file size in bytes.
    """
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="alambic-size-") as directory:
        path = os.path.join(directory, "model.safetensors")
        try:
            save_model(model, path)
        except (ValueError, TypeError, AttributeError, RuntimeError):
            path = os.path.join(directory, "model.pt")
            torch.save(model.state_dict(), path)
        return os.path.getsize(path)


def _first_sample(example_input: ExampleInput) -> ExampleInput:
    """Keep only the first sample of a batch (tensor or dict of tensors)."""
    if isinstance(example_input, Mapping):
        return {key: value[:1] for key, value in example_input.items()}
    return example_input[:1]


def repeat_batch(example_input: ExampleInput, batch_size: int) -> ExampleInput:
    """Repeat the first sample ``batch_size`` times along the batch dimension."""
    if isinstance(example_input, Mapping):
        return {key: repeat_batch(value, batch_size) for key, value in example_input.items()}
    sample = example_input[:1]
    return sample.repeat(batch_size, *([1] * (sample.ndim - 1))).contiguous()


def count_flops(model: nn.Module, example_input: ExampleInput) -> int:
    """Forward FLOPs for one sample, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    A multiply-accumulate counts as 2 FLOPs (``nn.Linear(10, 5)`` is 100 FLOPs). Only the
    operators PyTorch's counter knows are counted (matmuls, convolutions, attention);
    element-wise operations such as activations and normalisation count 0.

    Args:
        model: The model, in any mode (it runs in eval mode; its modes are restored).
        example_input: A batch-1 tensor or dict of tensors; a larger batch is cut to its first sample.

    Returns:
        The FLOPs of one forward pass on one sample.
    """
    from torch.utils.flop_counter import FlopCounterMode

    sample = send_to_device(_first_sample(example_input), model_device(model))
    counter = FlopCounterMode(display=False)
    with EvalMode(model), torch.no_grad(), counter:
        call_model(model, sample)
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so the wall clock measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` CPU intra-op threads (None keeps the current number); yields the
    number in use and restores the previous one after. Timings on a loaded machine are only comparable
    with it pinned: more threads than free cores make each op wait for a time slice."""
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)


def measure_latency(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    batch_size: int,
    repeats: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Wall-clock time of one forward pass on a batch, in milliseconds.

    The first sample of ``example_input`` is repeated to ``batch_size``; the model runs in eval
    mode under ``torch.inference_mode()``, ``warmup`` untimed passes first, then ``repeats`` passes
    each timed with ``time.perf_counter`` (CUDA is synchronised around each). The model is moved
    to ``device`` for the measurement and moved back afterwards. On CPU the result depends on
    the number of intra-op threads, which is reported: on a loaded machine, more threads than
    free cores can make a batch take 100x longer (threads wait for a time slice), so pass
    ``threads`` to pin it for comparable numbers.

    Args:
        model: The model to time.
        example_input: A batch-1 tensor or dict of tensors.
        batch_size: Batch size to time.
        repeats: Timed passes.
        warmup: Untimed passes before timing.
        device: Device to run on.
        threads: CPU intra-op threads during the measurement (restored after); None keeps
            ``torch.get_num_threads()``.

    Returns:
        ``{"median_ms", "p90_ms", "repeats", "batch_size", "device", "threads"}``.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(
            f"need batch_size >= 1, repeats >= 1, warmup >= 0, threads None or >= 1; got "
            f"batch_size={batch_size}, repeats={repeats}, warmup={warmup}, threads={threads}"
        )
    target_device = torch.device(device)
    original_device = model_device(model)
    batch = send_to_device(repeat_batch(example_input, batch_size), target_device)
    timings_ms: list[float] = []
    try:
        model.to(target_device)
        with pinned_threads(threads) as used_threads, EvalMode(model), torch.inference_mode():
            for _ in range(warmup):
                call_model(model, batch)
            for _ in range(repeats):
                synchronize(target_device)
                start = time.perf_counter()
                call_model(model, batch)
                synchronize(target_device)
                timings_ms.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.to(original_device)
    return {
        "median_ms": statistics.median(timings_ms),
        "p90_ms": float(np.percentile(timings_ms, 90)),
        "repeats": repeats,
        "batch_size": batch_size,
        "device": str(target_device),
        "threads": used_threads,
    }


def profile_model(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    batch_sizes: Iterable[int] = (1, 64),
    repeats: int = 20,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Parameters, size on disk, FLOPs per sample and median latency per batch size.

    Args:
        model: The model to profile.
        example_input: A batch-1 tensor or dict of tensors.
        batch_sizes: Batch sizes to time.
        repeats: Timed passes per batch size.
        device: Device for the latency measurement.
        threads: CPU intra-op threads for the latency measurement; None keeps the current number.

    Returns:
        ``{"parameters", "size_bytes", "flops", "latency_ms": {"1": median_ms, "64": ...},
        "latency_device", "latency_threads"}``; the latency keys are strings so the dict survives
        a JSON round trip unchanged, and the device and CPU thread count say where they were taken.

    Example:
        >>> profile = profile_model(student, torch.randn(1, 3, 32, 32))
        >>> profile["latency_ms"]["1"]
    """
    latencies = [
        measure_latency(
            model, example_input, batch_size=batch_size, repeats=repeats, device=device, threads=threads
        )
        for batch_size in batch_sizes
    ]
    return {
        "parameters": count_parameters(model),
        "size_bytes": size_on_disk(model),
        "flops": count_flops(model, example_input),
        "latency_ms": {str(latency["batch_size"]): latency["median_ms"] for latency in latencies},
        "latency_device": str(torch.device(device)),
        "latency_threads": latencies[0]["threads"] if latencies else torch.get_num_threads(),
    }
