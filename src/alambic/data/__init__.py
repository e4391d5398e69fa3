"""Datasets for distillation: numpy readers for the on-disk formats, tensors in memory.

Example:
    >>> from alambic.data import build_datasets
    >>> train, test, info = build_datasets("digits")
    >>> info.num_classes, info.input_shape
    (10, (64,))
"""

from alambic.data.datasets import (
    DATASETS,
    Augmentation,
    DatasetInfo,
    IndexedDataset,
    InMemoryDataset,
    build_datasets,
    dataset_fingerprint,
)
from alambic.data.readers import cache_dir, read_idx

__all__ = [
    "DATASETS",
    "Augmentation",
    "DatasetInfo",
    "InMemoryDataset",
    "IndexedDataset",
    "build_datasets",
    "cache_dir",
    "dataset_fingerprint",
    "read_idx",
]
