"""Indexed views of data sets, their fingerprints, and data loaders whose order depends only on the seed and the epoch (so a resumed run sees the same
batches), with whole-batch gathering for alambic's in-memory data sets."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, default_collate

from alambic.data.datasets import InMemoryDataset
from alambic.data.lengths import LengthGroupedSampler, token_lengths
from alambic.data.transfer import find_transfer
from alambic.errors import DataError


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``, so a resumed run sees the same batches."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_loader(
    dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    dynamic_padding: bool = False,
    group_by_length: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling is reproducible per epoch (see :class:`EpochSampler`).

    A data set with ``get_batch`` (alambic's in-memory sets) returns whole batches, gathered from its
    tensors in one indexing operation instead of one sample at a time and a collate; batches are pinned
    in page-locked memory when a GPU is there to receive them. A data set holding a
    :class:`~alambic.data.transfer.TransferDataset` is sampled by its ratio (its ``sampler``).
    ``dynamic_padding`` cuts each batch of token inputs to its longest row (see :func:`trim_padding`);
    ``group_by_length`` (shuffled loaders) also draws each batch from rows of similar length (see
    :class:`~alambic.data.lengths.LengthGroupedSampler`) and implies ``dynamic_padding``.
    """
    batched = hasattr(dataset, "get_batch")
    transfer = find_transfer(dataset)
    sampler = (
        EpochSampler(len(dataset), seed, shuffle) if transfer is None else transfer.sampler(seed, shuffle)
    )
    if group_by_length and shuffle:
        sampler = LengthGroupedSampler(sampler, token_lengths(dataset), batch_size, seed)
    collate = already_batched if batched else default_collate
    return DataLoader(
        BatchedView(dataset) if batched else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=PaddingTrimmer(collate) if dynamic_padding or group_by_length else collate,
        pin_memory=torch.cuda.is_available(),
    )


def trim_padding(batch: Any) -> Any:
    """A batch of token inputs cut to its longest row ("dynamic padding").

    Text sets are tokenized once, padded to their longest sentence; most batches are far shorter (SST-2's first
    2,000 sentences: 56 token columns, 41.5 for a random batch of 32 on average). The trailing columns where ``attention_mask`` is 0 in
    every row are dropped from every ``[B, T]`` tensor of the inputs (``input_ids``, ``attention_mask``,
    ``token_type_ids``; and ``labels`` of language-model dicts). Only padding goes, and positions do not
    move, so a model that honours its attention mask gives the same outputs. Batches without an
    ``attention_mask`` (images, left-padded rows ending in a real token) come back unchanged.
    """
    inputs = batch if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) else None
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("attention_mask"), torch.Tensor):
        return batch
    mask = inputs["attention_mask"]
    if mask.dim() != 2:
        return batch
    used = mask.any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    if width == mask.shape[1]:
        return batch
    trimmed = {
        key: value[:, :width].contiguous()
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == mask.shape
        else value
        for key, value in inputs.items()
    }
    if isinstance(batch, Mapping):
        return trimmed
    return type(batch)([trimmed, *batch[1:]]) if isinstance(batch, list) else (trimmed, *batch[1:])


class PaddingTrimmer:
    """A collate function followed by :func:`trim_padding` (a class, so worker processes can pickle it)."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, samples: Any) -> Any:
        return trim_padding(self.collate(samples))


def already_batched(batch: Any) -> Any:
    """The collate of data sets whose ``__getitems__`` returns a whole batch."""
    return batch


class IndexedDataset(Dataset):
    """Yields ``(input, label, index)``: the sample's position travels with it through the loader.

    Losses that keep per-sample state (CRD's memory bank) and cached teachers read ``index``.

    Example:
        >>> loader = DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True)
        >>> images, labels, index = next(iter(loader))
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple | dict:
        item = self.dataset[index]
        if isinstance(item, Mapping):  # token dicts (language-model data): the index is one more key
            return {**item, "index": index}
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError("IndexedDataset wraps data sets that yield (input, label) pairs or dicts")
        return item[0], item[1], index

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's samples for a DataLoader (PyTorch fetches through here when it exists): the same as
        ``[self[i] for i in indices]``, with the check made once a batch instead of a wrapper call per sample."""
        items = [self.dataset[index] for index in indices]
        if items and isinstance(items[0], Mapping):
            return [{**item, "index": index} for item, index in zip(items, indices)]
        if items and (not isinstance(items[0], (tuple, list)) or len(items[0]) != 2):
            raise DataError("IndexedDataset wraps data sets that yield (input, label) pairs or dicts")
        return [(item[0], item[1], index) for item, index in zip(items, indices)]

    def get_batch(self, indices: list[int]) -> tuple | dict:
        """A whole batch ``(inputs, labels, index)`` (or the dict with ``index``); batched by the wrapped
        set when it can."""
        if hasattr(self.dataset, "get_batch"):
            batch = self.dataset.get_batch(indices)
            if isinstance(batch, Mapping):
                return {**batch, "index": torch.tensor(indices)}
            inputs, labels = batch
            return inputs, labels, torch.tensor(indices)
        return default_collate([self[index] for index in indices])


class BatchedView(Dataset):
    """A data set with ``get_batch`` seen by a DataLoader as one that returns whole batches.

    The DataLoader calls ``__getitems__`` with a batch's indices; with :func:`already_batched`
    as its collate, a batch costs one tensor gather instead of a ``__getitem__`` per sample and a stack.
    The view is made by :func:`make_loader`, so a user's own DataLoader over the data set
    keeps PyTorch's per-sample behaviour.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, indices: list[int]):
        return self.dataset.get_batch(indices)


def dataset_fingerprint(dataset: Dataset) -> str:
    """A sha256 hex digest identifying a dataset's contents, for checking caches of teacher outputs.

    For an :class:`InMemoryDataset` it hashes the stored tensors' shapes and dtypes, all labels, up to
    256 evenly spaced inputs and the normalisation; augmentation is deliberately left out (it is not
    part of the data), so a cache of teacher outputs must check augmentation itself. For any other
    dataset it hashes the length and up to 32 evenly spaced samples as returned by ``dataset[i]``; for a
    ``ConcatDataset`` (a :class:`~alambic.data.transfer.TransferDataset`) it hashes each part's fingerprint.

    Example:
        >>> train, test, info = build_datasets("digits")
        >>> len(dataset_fingerprint(train))
        64
    """
    while isinstance(dataset, (IndexedDataset, BatchedView)):  # the data, not how it is served
        dataset = dataset.dataset
    digest = hashlib.sha256()
    if isinstance(dataset, ConcatDataset):  # a training set and its transfer rows: each part as itself
        for part in dataset.datasets:
            digest.update(dataset_fingerprint(part).encode())
        return digest.hexdigest()
    length = len(dataset)
    digest.update(f"len={length}".encode())
    if isinstance(dataset, InMemoryDataset):
        inputs, labels = dataset.inputs, dataset.labels
        digest.update(f"{tuple(inputs.shape)}{inputs.dtype}{dataset.mean}{dataset.std}".encode())
        digest.update(labels.numpy().astype(np.int64).tobytes())
        rows = torch.linspace(0, max(length - 1, 0), min(length, 256)).long()
        digest.update(inputs[rows].contiguous().numpy().tobytes())
        return digest.hexdigest()
    for index in torch.linspace(0, max(length - 1, 0), min(length, 32)).long().tolist():
        item = dataset[index]
        if isinstance(item, Mapping):  # language-model data: labels are one of the token tensors
            sample = item
        else:
            sample, label = item[:2]
            digest.update(f"label={int(label)}".encode())
        parts = sorted(sample.items()) if isinstance(sample, dict) else [("", sample)]  # token dicts
        for key, value in parts:
            value = torch.as_tensor(value)
            digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
