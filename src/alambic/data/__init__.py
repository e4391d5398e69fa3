"""Datasets for distillation: numpy readers for the on-disk formats, tensors in memory.

Example:
    >>> from alambic.data import build_datasets
    >>> train, test, info = build_datasets("digits")
    >>> info.num_classes, info.input_shape
    (10, (64,))
"""

from alambic.data.datasets import DATASETS, Augmentation, DatasetInfo, InMemoryDataset, build_datasets
from alambic.data.info import LMDatasetInfo
from alambic.data.lengths import LengthGroupedSampler, token_lengths
from alambic.data.lm import TextBlocks, TokenRows, build_lm_datasets
from alambic.data.loaders import IndexedDataset, dataset_fingerprint, make_loader, trim_padding
from alambic.data.readers import cache_dir, read_idx
from alambic.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from alambic.data.transfer import UNLABELLED, TransferDataset, TransferSampler, find_transfer

__all__ = [
    "DATASETS",
    "Augmentation",
    "DatasetInfo",
    "InMemoryDataset",
    "IndexedDataset",
    "LMDatasetInfo",
    "LengthGroupedSampler",
    "TextBlocks",
    "TokenRows",
    "TransferDataset",
    "TransferSampler",
    "UNLABELLED",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_datasets",
    "build_lm_datasets",
    "load_tokenizer",
    "cache_dir",
    "make_loader",
    "trim_padding",
    "token_lengths",
    "dataset_fingerprint",
    "find_transfer",
    "read_idx",
]
