"""Token axes of a teacher cache: which axes of each stored output grow with the number of tokens, so a
cache written at the data's full width can be cut to a batch trimmed of its padding (``dynamic_padding``),
and outputs of trimmed batches padded back to the stored width."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from alambic.core.batches import split_batch
from alambic.errors import ConfigError, first_line

Rows = Callable[[Any], dict[str, Tensor]]  # token inputs -> the outputs a cache stores for them


def mask_width(dataset: Dataset) -> int | None:
    """The token width of ``dataset``'s rows as stored (its first row's ``attention_mask``), or None for data
    without one (images, fixed-length language-model blocks)."""
    inputs = split_batch(default_collate([dataset[0]]))[0]
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return int(mask.shape[1]) if isinstance(mask, Tensor) and mask.dim() == 2 else None


def narrow_inputs(inputs: Mapping, width: int) -> dict:
    """Token inputs cut to their first ``width`` columns (every tensor shaped like the attention mask)."""
    shape = inputs["attention_mask"].shape
    return {
        key: value[:, :width] if isinstance(value, Tensor) and value.shape[:2] == shape else value
        for key, value in inputs.items()
    }


def token_axes_of(rows: Rows, dataset: Dataset, *, strict: bool) -> dict[str, list[int] | None] | None:
    """Which axes of each stored row grow with the number of tokens, one entry per token (hidden states
    ``[T, D]``: ``[0]``; attention maps ``[H, T, T]``: ``[1, 2]``; a convolution over tokens
    ``[C, T - k + 1]``: ``[1]``; logits of a classifier: ``[]``). Found by running the teacher (``rows``:
    token inputs to what is stored) on two rows at the data's full width ``T``, at ``T - 1`` and at
    ``T // 2``: those axes are cut when a batch is narrower, and padded back when it is cached so.

    An output that grows otherwise (a strided convolution over tokens) gets None: it cannot follow a cut
    batch (:func:`cut_to_width` refuses, and so does caching on cut batches, ``strict``). A teacher that
    cannot run narrower at all gives None for the whole cache (read by shape, as caches written before
    the axes were recorded), unless the cache itself runs on cut batches (``strict``)."""
    inputs = split_batch(default_collate([dataset[0], dataset[min(1, len(dataset) - 1)]]))[0]
    width = int(inputs["attention_mask"].shape[1])
    full = {name: list(value.shape[1:]) for name, value in rows(inputs).items()}
    probes = sorted({width - 1, width // 2} - {0}, reverse=True)  # narrower widths, none of them empty
    try:
        narrow = {probe: rows(narrow_inputs(inputs, probe)) for probe in probes}
    except Exception as error:  # noqa: BLE001 - any failure of the teacher on a narrower probe
        if strict:
            raise ConfigError(
                f"the teacher cannot run on batches cut to their longest row ({first_line(error)}); "
                "cache it without dynamic padding"
            ) from None
        return None
    axes: dict[str, list[int] | None] = {}
    for name, shape in full.items():
        shapes = {probe: list(narrow[probe][name].shape[1:]) for probe in probes}
        grows = [
            axis for axis in range(len(shape)) if any(cut[axis] != shape[axis] for cut in shapes.values())
        ]
        one_per_token = all(
            len(cut) == len(shape) and all(shape[axis] - cut[axis] == width - probe for axis in grows)
            for probe, cut in shapes.items()
        )
        axes[name] = grows if one_per_token else None
        if strict and not one_per_token:
            seen = ", ".join(f"{cut} at {probe}" for probe, cut in shapes.items())
            raise ConfigError(
                f"teacher output {name!r} ({shape} at {width} tokens, {seen}) does not grow by one entry "
                "per token, so it cannot be cached on batches cut to their longest row; cache it without "
                "dynamic padding"
            )
    return axes


def pad_to_width(
    rows: dict[str, Tensor], token_axes: dict[str, list[int] | None], missing: int
) -> dict[str, Tensor]:
    """Outputs of a batch cut ``missing`` tokens short padded back with zeros along their token axes
    (:func:`token_axes_of`), so every batch of a shard has the stored shape."""
    if missing == 0:
        return rows
    for name, axes in token_axes.items():
        value = rows[name]
        padding = [0] * (2 * value.dim())
        for axis in (
            axes or ()
        ):  # (None never reaches here: caching on cut batches refuses it)  # F.pad lists (left, right) pairs from the last dimension backwards
            padding[2 * (value.dim() - 2 - axis) + 1] = missing
        rows[name] = torch.nn.functional.pad(value, padding)
    return rows


def cut_to_width(
    outputs: dict[str, Tensor], inputs: Any, token_axes: dict[str, list[int] | None] | None, full: int | None
) -> dict[str, Tensor]:
    """Outputs cut to the batch's token width when the loader trimmed its padding (``dynamic_padding``):
    each token axis (:func:`token_axes_of`) loses as many entries as the batch lost columns. The cut
    columns were padding in every row of the batch, so nothing real is lost. Caches written before the
    token axes were recorded are read by shape: ``[B, T, ...]`` to ``[B, W, ...]``, attention maps
    ``[B, H, T, T]`` to ``[B, H, W, W]``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return outputs
    width = mask.shape[1]
    if token_axes is not None and full is not None:
        if width < full:
            for name in outputs:
                if token_axes[name] is None:
                    raise ConfigError(
                        f"the cached teacher output {name!r} does not grow by one entry per token, so it "
                        "cannot be cut to batches trimmed of their padding; set data.dynamic_padding and "
                        "data.group_by_length to false"
                    )
                for axis in token_axes[name]:
                    size = outputs[name].shape[axis + 1] - (full - width)
                    outputs[name] = outputs[name].narrow(axis + 1, 0, size)
        return outputs
    for name, value in outputs.items():
        if value.dim() == 4 and value.shape[-1] > width and value.shape[-1] == value.shape[-2]:
            outputs[name] = value[..., :width, :width]
        elif value.dim() >= 3 and value.shape[1] > width:
            outputs[name] = value[:, :width]
    return outputs
