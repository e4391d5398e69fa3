"""Tokenized text classification sets (SST-2), held in memory as padded tensors.

A sample is ``({"input_ids", "attention_mask", ...}, label)``; the loader stacks the dicts, and
:func:`alambic.core.batches.call_model` passes them to a Hugging Face model as keyword arguments. Sentences
are tokenized once, padded to the longest one in the split (at most ``max_length`` tokens), so a short-
sentence set such as SST-2 does not pay for 128 padded positions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch.utils.data import Dataset

from alambic.data.tokenizers import gguf_tokenizer
from alambic.errors import ConfigError, DataError
from alambic.imports import package_file, require

# name -> (train file, test file, class names); the GLUE SST-2 dev split is the usual test split
TEXT_DATASETS = {"sst2": ("train.tsv", "dev.tsv", ["negative", "positive"])}


class TokenizedDataset(Dataset):
    """Token tensors ``{key: [N, T]}`` and labels ``[N]``; yields ``({key: [T]}, label)``."""

    def __init__(self, columns: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.columns = columns
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        return {key: value[index] for key, value in self.columns.items()}, int(self.labels[index])

    def get_batch(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A whole batch ``({key: [B, T]}, labels [B])``."""
        return {key: value[indices] for key, value in self.columns.items()}, self.labels[indices]

    def subset(self, indices: torch.Tensor) -> TokenizedDataset:
        """A new dataset over ``indices``."""
        return TokenizedDataset(
            {key: value[indices] for key, value in self.columns.items()}, self.labels[indices]
        )


def read_tsv_rows(path: Path, columns: set[str]) -> list[dict[str, str]]:
    """The rows of a TSV file with a header row holding ``columns`` (GLUE's format: no quoting)."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not columns <= set(rows[0]):
        raise DataError(f"{path}: expected a header with {' and '.join(map(repr, sorted(columns)))} columns")
    return rows


def read_labelled_tsv(path: Path) -> tuple[list[str], list[int]]:
    """The ``sentence`` and ``label`` columns of a GLUE-style TSV file with a header row."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the folder holding train.tsv and dev.tsv as data_dir")
    rows = read_tsv_rows(path, {"sentence", "label"})
    try:
        return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]
    except (TypeError, ValueError):
        raise DataError(f"{path}: every label must be an integer") from None


def read_sentences(path: str | Path) -> list[str]:
    """The sentences of a text file (one per line, blank lines skipped) or of a ``.tsv`` file's ``sentence``
    column (SST-2's format: a header row, labels ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; pass a .txt file (one sentence a line) or an SST-2 style .tsv"
        )
    try:
        if path.suffix.lower() == ".tsv":
            sentences = [(row["sentence"] or "").strip() for row in read_tsv_rows(path, {"sentence"})]
        else:
            sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; pass a .txt or .tsv file") from None
    sentences = [sentence for sentence in sentences if sentence]
    if not sentences:
        raise DataError(f"{path} holds no sentences")
    return sentences


def load_tokenizer(name_or_path: str):
    """A ``transformers`` tokenizer from a folder (offline), a hub id or a ``.gguf`` model file (either may
    be ``pkg:PACKAGE/PATH``, inside an installed package)."""
    name_or_path = package_file(str(name_or_path))
    if name_or_path.lower().endswith(".gguf"):
        return gguf_tokenizer(name_or_path)
    try:
        return require(
            "transformers", "hf", purpose="text data sets (tokenizers)"
        ).AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot load the tokenizer {name_or_path!r}: {str(error).splitlines()[0]}"
        ) from None


def tokenize(tokenizer, sentences: list[str], labels: list[int], *, max_length: int) -> TokenizedDataset:
    """Tokenize once, padded to the longest sentence (at most ``max_length`` tokens)."""
    encoding = tokenizer(
        sentences, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return TokenizedDataset(dict(encoding), torch.tensor(labels))


def build_text_datasets(
    name: str, data_dir: Path, *, tokenizer: str | None, max_length: int
) -> tuple[TokenizedDataset, TokenizedDataset, list[str], int]:
    """Train and test sets of a named text data set, its class names and the tokenizer's vocabulary size."""
    if tokenizer is None:
        raise ConfigError(
            f"dataset {name!r} needs a tokenizer: set data.tokenizer (a folder or hub id), or use a "
            "Hugging Face teacher (arch: hf:PATH), whose tokenizer is then used"
        )
    train_file, test_file, class_names = TEXT_DATASETS[name]
    loaded = load_tokenizer(tokenizer)
    train = tokenize(loaded, *read_labelled_tsv(data_dir / train_file), max_length=max_length)
    test = tokenize(loaded, *read_labelled_tsv(data_dir / test_file), max_length=max_length)
    return train, test, class_names, len(loaded)
