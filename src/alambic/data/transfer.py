"""Transfer sets: inputs without labels that only the teacher labels (Hinton et al. 2015, section 2).

A :class:`TransferDataset` puts a labelled training set and an unlabelled one end to end: rows ``0 ..
N - 1`` are the training set's, rows ``N .. N + M - 1`` the transfer set's, whose label is
:data:`UNLABELLED` (-100, PyTorch's ``ignore_index``). Terms that need labels (``ce``, ``dkd``, ...) skip
those rows (:class:`alambic.core.distiller.Distiller`); terms that read the teacher use every row.
Its :class:`TransferSampler` sets how many transfer rows an epoch holds (``ratio``), shuffled together
with every labelled row, so most batches hold both kinds.

The files a run config names are read by :mod:`alambic.data.transfer_files`.

Example:
    >>> combined = TransferDataset(train_set, unlabelled_set, ratio=1.0)  # as many transfer rows as labelled
    >>> loader = make_loader(combined, batch_size=64, shuffle=True)  # picks combined.sampler(...)
    >>> student = distill(teacher, student, loader, terms=[{"loss": "ce", "weight": 0.1},
    ...                                                   {"loss": "kd", "weight": 0.9}])
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Sampler, default_collate

from alambic.errors import ConfigError

UNLABELLED = -100  # the label of a transfer row (F.cross_entropy's default ignore_index)


class TransferDataset(ConcatDataset):
    """A labelled training set followed by unlabelled transfer rows, whose label is :data:`UNLABELLED`.

    Args:
        labelled: yields ``(input, label)``.
        transfer: yields inputs, or ``(input, label)`` pairs whose labels are dropped (the training
            images under other augmentations can be a transfer set).
        ratio: transfer rows per labelled row in an epoch (``1.0``: as many as there are labelled rows);
            None: every transfer row once per epoch. See :class:`TransferSampler`.
    """

    def __init__(self, labelled: Dataset, transfer: Dataset, *, ratio: float | None = None) -> None:
        if len(transfer) == 0:
            raise ConfigError("the transfer set is empty; give it at least one row or remove it")
        if ratio is not None and not ratio > 0:
            raise ConfigError(f"the transfer ratio must be > 0 (transfer rows per labelled row), got {ratio}")
        super().__init__([labelled, transfer])
        self.ratio = ratio

    @property
    def labelled(self) -> Dataset:
        return self.datasets[0]

    @property
    def transfer(self) -> Dataset:
        return self.datasets[1]

    @property
    def augmentation(self) -> Any:
        """The labelled set's augmentation (the run's transfer rows share it)."""
        return getattr(self.labelled, "augmentation", None)

    @augmentation.setter
    def augmentation(self, value: Any) -> None:
        # copies of the parts (sharing their tensors), so that a copy of this set leaves the original as it is
        parts = []
        for part in self.datasets:
            if hasattr(part, "augmentation"):
                part = copy.copy(part)
                part.augmentation = value
            parts.append(part)
        self.datasets = parts

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < 0:
            index += len(self)
        if index < len(self.labelled):
            return self.labelled[index]
        return _without_label(self.transfer[index - len(self.labelled)]), UNLABELLED

    def get_batch(self, indices: list[int]) -> tuple[Any, Tensor]:
        """A whole batch ``(inputs, labels)`` in the order of ``indices``, each part gathered at once."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        is_transfer = indices >= len(self.labelled)  # [B]
        parts = []
        if (~is_transfer).any():
            parts.append(_part_batch(self.labelled, indices[~is_transfer]))
        if is_transfer.any():
            inputs, _ = _part_batch(self.transfer, indices[is_transfer] - len(self.labelled))
            parts.append((inputs, torch.full((int(is_transfer.sum()),), UNLABELLED, dtype=torch.int64)))
        if len(parts) == 1:
            return parts[0]
        # rows were gathered labelled first; put each back at its position in the batch
        order = torch.cat([(~is_transfer).nonzero().squeeze(1), is_transfer.nonzero().squeeze(1)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return _join(parts[0], parts[1], inverse)

    def sampler(self, seed: int = 0, shuffle: bool = True) -> TransferSampler:
        """The sampler of this set's ``ratio`` (what :func:`alambic.data.make_loader` uses for it)."""
        return TransferSampler(len(self.labelled), len(self.transfer), self.ratio, seed=seed, shuffle=shuffle)


def _without_label(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) else item


def _part_batch(dataset: Dataset, indices: Tensor) -> tuple[Any, Any]:
    """``(inputs, labels)`` of rows ``indices`` of one part: gathered at once when it can, else collated."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices.tolist())
    items = [dataset[index] for index in indices.tolist()]
    inputs = default_collate([_without_label(item) for item in items])
    if isinstance(items[0], (tuple, list)) and len(items[0]) >= 2:
        return inputs, default_collate([item[1] for item in items])
    return inputs, None  # bare inputs, or TensorDataset's one-tuples


def _join(first: Any, second: Any, inverse: Tensor) -> Any:
    """Two batches of one structure concatenated, rows reordered by ``inverse``."""
    if isinstance(first, Mapping):
        missing = set(first) ^ set(second)
        if missing:
            raise ConfigError(f"the transfer rows and the training rows differ in keys {sorted(missing)}")
        return {key: _join(first[key], second[key], inverse) for key in first}
    if isinstance(first, (tuple, list)):
        return tuple(_join(a, b, inverse) for a, b in zip(first, second))
    return torch.cat([torch.as_tensor(first), torch.as_tensor(second)])[inverse]


class TransferSampler(Sampler[int]):
    """Every labelled row and ``round(ratio * num_labelled)`` transfer rows per epoch (all of them when
    ``ratio`` is None), shuffled together; the order depends only on ``(seed, epoch)``, as
    :class:`alambic.data.loaders.EpochSampler`'s does.

    Transfer rows are drawn without replacement, continuing from epoch to epoch through seeded
    permutations of the transfer set, so every row is seen once before any is seen twice.
    """

    def __init__(
        self, num_labelled: int, num_transfer: int, ratio: float | None, seed: int = 0, shuffle: bool = True
    ):
        self.num_labelled, self.num_transfer = num_labelled, num_transfer
        self.per_epoch = num_transfer if ratio is None else round(ratio * num_labelled)
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def transfer_rows(self) -> Tensor:
        """This epoch's transfer rows, as positions in the transfer set."""
        start = self.epoch * self.per_epoch
        positions = torch.arange(start, start + self.per_epoch)
        cycles, offsets = positions // self.num_transfer, positions % self.num_transfer
        rows = torch.empty_like(positions)
        for cycle in cycles.unique().tolist():
            where = cycles == cycle
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * cycle + 1)
                permutation = torch.randperm(self.num_transfer, generator=generator)
            else:
                permutation = torch.arange(self.num_transfer)
            rows[where] = permutation[offsets[where]]
        return rows

    def __iter__(self) -> Iterator[int]:
        indices = torch.cat([torch.arange(self.num_labelled), self.num_labelled + self.transfer_rows()])
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            indices = indices[torch.randperm(len(indices), generator=generator)]
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.num_labelled + self.per_epoch


def find_transfer(dataset: Any) -> TransferDataset | None:
    """The :class:`TransferDataset` inside ``dataset`` (through the views that wrap one), else None."""
    while dataset is not None:
        if isinstance(dataset, TransferDataset):
            return dataset
        dataset = getattr(dataset, "dataset", None)  # IndexedDataset, MixedDataset, BatchedView, Subset
    return None
