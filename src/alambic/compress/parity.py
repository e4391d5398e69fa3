"""How an export is compared with the PyTorch model it came from: reference logits, largest difference,
finite outputs. Shared by the ONNX / torch.export / safetensors exports and the Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.core.batches import call_model, logits_of
from alambic.errors import AlambicError


@torch.no_grad()
def reference_outputs(model: nn.Module, inputs: Any) -> Tensor:
    """The PyTorch model's logits on ``inputs`` (eval mode, float32): what an export must reproduce."""
    return logits_of(call_model(model.eval(), inputs)).float()  # [N, C]


def max_diff(reference: Tensor, other: Any) -> float:
    """The largest absolute difference between an export's outputs and the reference; shapes must agree."""
    other = torch.as_tensor(other).float()
    if other.shape != reference.shape:
        raise AlambicError(
            f"the export returned shape {tuple(other.shape)}, PyTorch {tuple(reference.shape)}"
        )
    return float((other - reference).abs().max())


def prediction_agreement(references: list[Tensor], outputs: list[Any]) -> float:
    """The fraction of predictions (argmax over the last dimension) an export shares with the reference,
    over all checked batches: how often the file would answer as the model does."""
    same = total = 0
    for reference, output in zip(references, outputs, strict=True):
        predicted = torch.as_tensor(output).float().argmax(-1)  # [N] (or [N, T] for token outputs)
        same += int((predicted == reference.argmax(-1)).sum())
        total += predicted.numel()
    return same / total if total else float("nan")


def check_finite(outputs: list[Tensor], export_format: str, final: Path) -> None:
    """Refuse an export whose outputs hold inf or NaN."""
    if not all(bool(torch.isfinite(torch.as_tensor(output)).all()) for output in outputs):
        raise AlambicError(f"the {export_format} export of {final} gives non-finite outputs")
