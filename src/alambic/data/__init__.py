"""Datasets for distillation: numpy readers for the on-disk formats, tensors in memory.

Example:
    >>> from alambic.data import build_datasets
    >>> train, test, info = build_datasets("digits")
    >>> info.num_classes, info.input_shape
    (10, (64,))
"""

from alambic.data.datasets import DATASETS, Augmentation, DatasetInfo, InMemoryDataset, build_datasets
from alambic.data.loaders import IndexedDataset, dataset_fingerprint, make_loader
from alambic.data.readers import cache_dir, read_idx

__all__ = [
    "DATASETS",
    "Augmentation",
    "DatasetInfo",
    "InMemoryDataset",
    "IndexedDataset",
    "build_datasets",
    "cache_dir",
    "make_loader",
    "dataset_fingerprint",
    "read_idx",
]
