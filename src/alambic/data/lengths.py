"""Rows' token lengths and batches of rows of similar length ("group by length").

Cutting a batch to its longest row (:func:`alambic.data.loaders.trim_padding`) helps only as much as its
rows' lengths agree; a random batch of 32 SST-2 training sentences is as wide as its longest (40.1
tokens on average). :class:`LengthGroupedSampler` takes the epoch's shuffled order in chunks of
``group`` batches, sorts each chunk by length, cuts it into batches and shuffles the batches: every row
is still seen once an epoch in a seeded order, and batches are about as wide as their rows (14.0 tokens
on SST-2; ``benchmarks/dynamic_padding.py --sentences 67349``). The same idea as Hugging Face's ``LengthGroupedSampler`` (its
"megabatches" of 50 batches) and torchtext's ``BucketIterator``; written for alambic's per-epoch seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Sampler, Subset

from alambic.errors import ConfigError


def token_lengths(dataset: Any) -> Tensor:
    """Each row's length in tokens (``[N]``: its last position whose ``attention_mask`` is 1, plus one).

    Reads the ``attention_mask`` column of alambic's token sets (text classification, padded
    language-model rows) through the views that wrap them (``IndexedDataset``, ``Subset``, transfer sets'
    ``ConcatDataset``). Raises a ConfigError for data without one (images, fixed-length text blocks).
    """
    if isinstance(dataset, Subset):
        return token_lengths(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([token_lengths(part) for part in dataset.datasets])
    columns = getattr(dataset, "columns", None)
    mask = columns.get("attention_mask") if isinstance(columns, dict) else None
    if isinstance(mask, Tensor) and mask.dim() == 2:
        used = mask != 0
        last = mask.shape[1] - used.flip(1).int().argmax(1)  # one past the last real token
        return torch.where(used.any(1), last, torch.zeros_like(last))
    inner = getattr(dataset, "dataset", None)
    if inner is not None:
        return token_lengths(inner)
    raise ConfigError(
        f"grouping batches by length needs token rows with an attention_mask (text sets, padded "
        f"language-model rows); {type(dataset).__name__} has none: set data.group_by_length: false"
    )


class LengthGroupedSampler(Sampler[int]):
    """The order of ``sampler`` regrouped so that each batch of ``batch_size`` holds rows of similar length.

    Each epoch the wrapped sampler's order is taken ``group`` batches at a time; each chunk is sorted by
    length (longest first) and cut into batches, and the full batches are shuffled by ``(seed, epoch)``
    (the one short batch, if any, stays last, so a DataLoader with the same ``batch_size`` cuts the
    stream into exactly these batches). The rows of an epoch are the wrapped sampler's (a transfer set's
    ratio is kept); only their grouping changes.

    Example:
        >>> sampler = LengthGroupedSampler(EpochSampler(len(train_set)), token_lengths(train_set), 32)
        >>> loader = DataLoader(train_set, batch_size=32, sampler=sampler, collate_fn=PaddingTrimmer(...))
    """

    def __init__(self, sampler: Any, lengths: Tensor, batch_size: int, seed: int = 0, group: int = 50):
        if group < 1 or batch_size < 1:
            raise ConfigError(f"batch_size and group must be >= 1, got {batch_size} and {group}")
        self.sampler, self.lengths, self.batch_size = sampler, lengths.long(), batch_size
        self.seed, self.group, self.epoch = seed, group, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def batches(self) -> list[Tensor]:
        """This epoch's batches of row indices, in the order they are served."""
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        chunk = self.batch_size * self.group
        batches: list[Tensor] = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[torch.sort(self.lengths[part], descending=True, stable=True).indices]
            batches.extend(part.split(self.batch_size))
        full = [batch for batch in batches if len(batch) == self.batch_size]
        short = [batch for batch in batches if len(batch) < self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 104_729)
        return [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short

    def __iter__(self) -> Iterator[int]:
        batches = self.batches()
        return iter(torch.cat(batches).tolist() if batches else [])

    def __len__(self) -> int:
        return len(self.sampler)
