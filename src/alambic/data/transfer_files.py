"""The files a transfer set is read from (``data.transfer`` in a run config), shaped as the training set's rows.

- Text-classification sets (``sst2``): a ``.txt`` file (one example per line, blank lines skipped) or a
  ``.jsonl`` file (one object per line, its ``field`` holds the text), tokenized with the run's tokenizer
  to the training set's width (its longest sentence, at most ``data.max_length`` tokens).
- Image and array sets (held as tensors: ``mnist``, ``cifar10``, ``digits``, ...): a ``.npy`` / ``.npz``
  array shaped ``[M, *training input shape]`` (``uint8`` pixels where the training images are ``uint8``),
  or a folder of image files (read in sorted path order, converted to the training images' channels and
  resized to their height and width). They get the training set's normalisation and augmentation.

Every problem (a missing, empty or unreadable file, rows of another shape) is one :class:`ConfigError`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from alambic.data.datasets import InMemoryDataset
from alambic.data.text import TokenizedDataset, load_tokenizer
from alambic.data.transfer import UNLABELLED
from alambic.errors import ConfigError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEXT_SUFFIXES = (".txt", ".jsonl")
ARRAY_SUFFIXES = (".npy", ".npz")


def build_transfer_rows(
    train_set: Dataset,
    path: str | Path,
    *,
    field: str = "text",
    key: str | None = None,
    max_rows: int | None = None,
    tokenizer: str | None = None,
) -> Dataset:
    """The transfer set at ``path`` as a data set of the training set's kind, every label :data:`UNLABELLED`.

    ``field``: the text field of a ``.jsonl`` file; ``key``: the array of a ``.npz`` file (default: its
    only one); ``max_rows``: keep the first rows only; ``tokenizer``: the run's (text sets).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.transfer.path {path} does not exist; give a file or folder that does")
    if isinstance(train_set, TokenizedDataset):
        texts = read_texts(path, field=field, max_rows=max_rows)
        return tokenize_rows(train_set, texts, tokenizer)
    if isinstance(train_set, InMemoryDataset):
        expected = tuple(train_set.inputs.shape[1:])
        if path.is_dir():
            if len(expected) != 3 or train_set.inputs.dtype != torch.uint8:
                raise ConfigError(
                    f"data.transfer.path {path} is a folder of images, but the training inputs are not "
                    f"images (shape {expected}); give a .npy array of rows shaped {expected}"
                )
            array = read_image_folder(path, expected, max_rows=max_rows)
        else:
            array = read_array(path, key=key, max_rows=max_rows)
        inputs = _as_training_inputs(array, train_set.inputs, path)
        return InMemoryDataset(
            inputs,
            torch.full((len(inputs),), UNLABELLED, dtype=torch.int64),
            mean=train_set.mean,
            std=train_set.std,
            augmentation=train_set.augmentation,
        )
    raise ConfigError(
        f"data.transfer reads text lines for text-classification sets and arrays or image folders for "
        f"image sets; {type(train_set).__name__} data is not one of them: build an "
        "alambic.data.TransferDataset in Python instead"
    )


def read_texts(path: Path, *, field: str = "text", max_rows: int | None = None) -> list[str]:
    """The non-blank lines of a ``.txt`` file, or the ``field`` of each object of a ``.jsonl`` file."""
    if path.suffix not in TEXT_SUFFIXES or not path.is_file():
        raise ConfigError(
            f"data.transfer.path {path}: a text set's transfer rows are a {' or '.join(TEXT_SUFFIXES)} file"
        )
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"cannot read data.transfer.path {path} ({error}); give a UTF-8 text file"
        ) from None
    texts = []
    for number, line in enumerate(lines[:max_rows], 1):
        if path.suffix == ".txt":
            texts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: row {number} is not JSON ({error.msg}); fix or remove it") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ConfigError(
                f"{path}: row {number} has no text field {field!r}; set data.transfer.field to the key "
                "that holds each example's text"
            )
        texts.append(row[field])
    if not texts:
        raise ConfigError(f"data.transfer.path {path} holds no examples; give a file with one per line")
    return texts


def tokenize_rows(train_set: TokenizedDataset, texts: list[str], tokenizer: str | None) -> TokenizedDataset:
    """``texts`` tokenized to the training set's columns and width (padded or cut to it)."""
    if tokenizer is None:
        raise ConfigError("data.transfer: text rows need the run's tokenizer; set data.tokenizer")
    width = train_set.columns["input_ids"].shape[1]
    encoding = load_tokenizer(tokenizer)(
        texts, padding="max_length", truncation=True, max_length=width, return_tensors="pt"
    )
    missing = sorted(set(train_set.columns) - set(encoding))
    if missing:
        raise ConfigError(f"data.transfer: the tokenizer gives no {missing} for the transfer rows")
    columns = {name: encoding[name].to(column.dtype) for name, column in train_set.columns.items()}
    return TokenizedDataset(columns, torch.full((len(texts),), UNLABELLED, dtype=torch.int64))


def read_array(path: Path, *, key: str | None = None, max_rows: int | None = None) -> np.ndarray:
    """The rows of a ``.npy`` file, or of array ``key`` of a ``.npz`` file (its only array by default)."""
    if path.suffix not in ARRAY_SUFFIXES:
        raise ConfigError(
            f"data.transfer.path {path}: an image set's transfer rows are a .npy or .npz array or a folder "
            "of images"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                names = list(loaded.files)
                if key is None and len(names) != 1:
                    raise ConfigError(
                        f"{path} holds arrays {names}; set data.transfer.key to the one with the inputs"
                    )
                if (key or names[0]) not in names:
                    raise ConfigError(f"{path} has no array {key!r}; it holds {names}")
                array = loaded[key or names[0]]
        else:
            array = loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ConfigError(
            f"cannot read data.transfer.path {path} ({first_line(error)}); give a .npy or .npz file"
        ) from None
    if array.ndim == 0 or len(array) == 0:
        raise ConfigError(f"data.transfer.path {path} holds no rows")
    return array[:max_rows]


def read_image_folder(path: Path, shape: tuple[int, ...], *, max_rows: int | None = None) -> np.ndarray:
    """The image files under ``path`` (sorted), as ``uint8 [M, C, H, W]`` of the training images' ``shape``."""
    from PIL import Image, UnidentifiedImageError  # Pillow is needed only for image folders

    files = sorted(file for file in path.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES)[:max_rows]
    if not files:
        raise ConfigError(f"data.transfer.path {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    channels, height, width = shape
    if channels not in (1, 3):
        raise ConfigError(f"image folders give 1 or 3 channels; the training images have {channels}")
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for number, file in enumerate(files):
        try:
            with Image.open(file) as image:
                pixels = image.convert("L" if channels == 1 else "RGB").resize((width, height))
        except (OSError, UnidentifiedImageError) as error:
            raise ConfigError(
                f"cannot read transfer image {file} ({first_line(error)}); fix or remove it"
            ) from None
        array = np.asarray(pixels, dtype=np.uint8)  # [H, W] or [H, W, 3]
        images[number] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return images


def _as_training_inputs(array: np.ndarray, training: torch.Tensor, path: Path) -> torch.Tensor:
    """``array`` as a tensor of the training inputs' row shape and dtype, or a one-line error."""
    expected = tuple(training.shape[1:])
    if tuple(array.shape[1:]) != expected:
        raise ConfigError(
            f"data.transfer.path {path} has rows of shape {tuple(array.shape[1:])}, but the training inputs "
            f"are {expected}: give rows shaped as the training inputs ([M, {', '.join(map(str, expected))}])"
        )
    if training.dtype == torch.uint8 and array.dtype != np.uint8:
        raise ConfigError(
            f"data.transfer.path {path} holds {array.dtype} values, but the training images are uint8 "
            "pixels (0..255): save the transfer images as uint8"
        )
    if array.dtype.kind not in "uif":
        raise ConfigError(f"data.transfer.path {path} holds {array.dtype} values; give numbers")
    return torch.from_numpy(np.ascontiguousarray(array)).to(training.dtype)
