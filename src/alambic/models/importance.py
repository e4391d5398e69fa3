"""How much each layer of a model changes its hidden states: ShortGPT's Block Influence.

Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"
(https://arxiv.org/abs/2403.03853): the Block Influence of layer ``i`` is

    BI_i = 1 - E_tokens[ cos(x_i, x_{i+1}) ]

where ``x_i`` is the layer's input hidden state at a token and ``x_{i+1}`` its output, averaged over the
tokens of calibration text. A layer whose output points where its input did (BI near 0) changes little;
removing the layers of lowest BI first costs the least. :func:`alambic.models.hf.derive_student` keeps the
``layers`` of highest BI (``by="importance"``).

The inputs and outputs are read by a forward hook on each block rather than from
``output_hidden_states``, whose last entry is the final norm's output in Llama-style decoders (not the last
block's); the hooks live only for the measurement and the model is left as it was.

Example:
    >>> windows = text_windows(tokenizer.encode(text), block_size=256, windows=32)   # [32, 256]
    >>> scores = block_influence(teacher, windows)       # one float per teacher layer
    >>> most_important(scores, 10)                       # the 10 layers to keep, in order
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.errors import ConfigError, DataError
from alambic.models.surgery import layer_list

CALIBRATION_WINDOWS = 32  # calibration text by default: windows of
CALIBRATION_BLOCK = 256  # this many tokens


def text_windows(ids: Sequence[int] | Tensor, *, block_size: int, windows: int) -> Tensor:
    """The first ``windows`` non-overlapping windows of ``block_size`` token ids: ``[W, T]``.

    Fewer windows when the text is shorter; a text shorter than one window is a one-line error.
    """
    if block_size < 2 or windows < 1:
        raise ConfigError(f"calibration needs block_size >= 2 and windows >= 1, got {block_size}, {windows}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    count = min(windows, ids.numel() // block_size)
    if count == 0:
        raise DataError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of {block_size}; "
            "give a longer text or a smaller block size"
        )
    return ids[: count * block_size].view(count, block_size)


def file_calibration(
    tokenizer: Any,
    path: str | Path,
    *,
    windows: int = CALIBRATION_WINDOWS,
    block_size: int = CALIBRATION_BLOCK,
) -> Tensor:
    """The first ``windows`` windows of ``block_size`` tokens of a UTF-8 text file, ``[W, T]``, tokenized by
    a ``transformers`` tokenizer (no special tokens): calibration text for ``by="importance"``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the calibration text {path}: {error}") from None
    needed = windows * block_size * 16  # characters enough for the windows (a token is a few characters)
    ids = tokenizer(text[:needed], add_special_tokens=False)["input_ids"]
    return text_windows(ids, block_size=block_size, windows=windows)


def calibration_batches(windows: Tensor | Iterable[Any], batch_size: int = 8) -> list[dict[str, Tensor]]:
    """``windows`` as model inputs: a ``[W, T]`` id tensor (or a dict of such tensors: ``input_ids``,
    ``attention_mask``) cut into batches of ``batch_size`` rows, or an iterable of samples / batches (tensors of ids or dicts with ``input_ids`` and optionally
    ``attention_mask``; other keys, such as labels, are dropped)."""
    if isinstance(windows, Mapping):  # one batch of all windows: {"input_ids": [W, T], ...}
        keys = [key for key in ("input_ids", "attention_mask") if key in windows]
        chunks = zip(*(torch.as_tensor(windows[key]).split(batch_size) for key in keys))
        return [dict(zip(keys, chunk)) for chunk in chunks]
    if isinstance(windows, Tensor):
        if windows.dim() != 2 or windows.numel() == 0:
            raise DataError(
                f"calibration ids must be a non-empty [windows, tokens] tensor, got {tuple(windows.shape)}"
            )
        return [{"input_ids": chunk} for chunk in windows.split(batch_size)]
    batches = []
    for item in windows:
        batch = dict(item) if isinstance(item, Mapping) else {"input_ids": item}
        batch = {key: torch.as_tensor(batch[key]) for key in ("input_ids", "attention_mask") if key in batch}
        if "input_ids" not in batch:
            raise DataError("a calibration sample has no input_ids")
        batches.append(
            {key: value if value.dim() == 2 else value.unsqueeze(0) for key, value in batch.items()}
        )
    if not batches:
        raise DataError("no calibration text: give at least one window")
    return batches


def calibration_tokens(windows: Tensor | Iterable[Any]) -> int:
    """How many tokens of ``windows`` :func:`block_influence` averages over (padding left out)."""
    return sum(
        int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        for batch in calibration_batches(windows)
    )


def _hidden(value: Any) -> Tensor:
    """The hidden-state tensor of a block's input or output (the first element of a tuple)."""
    return value[0] if isinstance(value, tuple | list) else value


@torch.no_grad()
def block_influence(model: nn.Module, windows: Tensor | Iterable[Any], *, batch_size: int = 8) -> list[float]:
    """ShortGPT's Block Influence of every layer of ``model`` on ``windows``: ``1 - mean cos(input, output)``
    over their tokens (padding, where an ``attention_mask`` marks it, left out), computed in float64.

    ``windows``: a ``[W, T]`` tensor of token ids or an iterable of samples (see
    :func:`calibration_batches`). The model runs in eval mode; its mode is restored afterwards.

    Example:
        >>> block_influence(teacher, torch.randint(0, 100, (4, 32)))
        [0.41, 0.07, 0.12]
    """
    _, blocks = layer_list(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    current: dict[str, Tensor | None] = {"mask": None}

    def measure(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            inputs = _hidden(args[0] if args else kwargs["hidden_states"]).double()  # [B, T, H]
            cosine = F.cosine_similarity(inputs, _hidden(output).double(), dim=-1)  # [B, T]
            mask = current["mask"]
            weights = torch.ones_like(cosine) if mask is None else mask.to(cosine)
            sums[index] += (cosine * weights).sum().cpu()
            counts[index] += weights.sum().cpu()

        return hook

    handles = [block.register_forward_hook(measure(i), with_kwargs=True) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in calibration_batches(windows, batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            current["mask"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if (counts == 0).any():
        raise DataError("the calibration text reached no token of some layer; give longer windows")
    return [float(1.0 - total / count) for total, count in zip(sums, counts)]


def most_important(scores: Sequence[float], layers: int) -> list[int]:
    """The indices of the ``layers`` highest scores, in increasing order (ties keep the earlier layer).

    Example:
        >>> most_important([0.5, 0.0, 0.2, 0.9], 2)
        [0, 3]
    """
    if not 1 <= layers <= len(scores):
        raise ConfigError(
            f"--layers must be in 1..{len(scores)} (the teacher has {len(scores)}), got {layers}"
        )
    ranked = sorted(range(len(scores)), key=lambda index: (-scores[index], index))
    return sorted(ranked[:layers])
