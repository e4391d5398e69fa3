"""In-memory datasets and :func:`build_datasets`, the one entry point that turns a name into data.

Every built-in dataset is held in memory as two tensors (inputs and labels). Images stay ``uint8``
(a quarter of the memory of float32) and are converted, augmented and normalised per sample in
:meth:`InMemoryDataset.__getitem__`, in the order torchvision's ``RandomCrop(padding=p)``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` would apply them, so padding is black pixels.
Augmentation draws from torch's global RNG, so ``torch.manual_seed`` makes a run repeatable
(DataLoader workers derive their seeds from it too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from alambic.data import readers
from alambic.data.info import DatasetInfo
from alambic.data.lm import LM_DATASETS, build_lm_datasets
from alambic.data.text import TEXT_DATASETS, build_text_datasets
from alambic.errors import ConfigError, DataError
from alambic.imports import import_callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DATASETS = [
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10-jpeg",
    "cifar10",
    "cifar100",
    "sst2",
    "custom",
    *LM_DATASETS,
]


@dataclass(frozen=True)
class Augmentation:
    """Random crop with zero padding, then an optional horizontal flip (images only)."""

    crop_padding: int
    horizontal_flip: bool


class InMemoryDataset(Dataset):
    """Inputs and labels held as tensors; yields ``(float32 input, int label)``.

    Args:
        inputs: ``[N, ...]``; ``uint8`` images ``[N, C, H, W]`` are scaled to [0, 1] per sample,
            floating inputs are used as they are.
        labels: ``[N]`` integer class labels.
        mean: Per-channel mean to subtract after scaling (images only), or None.
        std: Per-channel std to divide by, or None.
        augmentation: Applied in ``__getitem__`` to images, or None.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augmentation: Augmentation | None = None,
    ) -> None:
        if len(inputs) != len(labels):
            raise DataError(f"{len(inputs)} inputs but {len(labels)} labels; they must match one to one")
        if augmentation is not None and inputs.dim() != 4:
            raise ConfigError(
                f"augmentation needs images [N, C, H, W], got inputs of shape {tuple(inputs.shape)}"
            )
        self.inputs = inputs
        self.labels = labels.long()
        self.mean = None if mean is None else tuple(float(value) for value in mean)
        self.std = None if std is None else tuple(float(value) for value in std)
        self.augmentation = augmentation
        channel_shape = (-1,) + (1,) * (inputs.dim() - 2)  # broadcast over H, W
        self._mean = None if mean is None else torch.tensor(self.mean).view(channel_shape)
        self._std = None if std is None else torch.tensor(self.std).view(channel_shape)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.inputs[index]
        sample = sample.float().div_(255.0) if sample.dtype == torch.uint8 else sample.float()
        if self.augmentation is not None:
            sample = _augment(sample, self.augmentation)
        if self._mean is not None:
            sample = (sample - self._mean) / self._std
        return sample, int(self.labels[index])

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch ``(inputs [B, ...], labels [B])``, equal to stacking ``self[i]`` for each index."""
        if self.augmentation is not None:  # per sample, drawing the global RNG in the same order
            samples = [self[index] for index in indices]
            return torch.stack([sample for sample, _ in samples]), self.labels[indices]
        batch = self.inputs[indices]
        batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
        if self._mean is not None:
            batch = (batch - self._mean) / self._std
        return batch, self.labels[indices]

    def subset(self, indices: torch.Tensor) -> InMemoryDataset:
        """A new dataset over ``indices`` with the same normalisation and augmentation."""
        return InMemoryDataset(
            self.inputs[indices],
            self.labels[indices],
            mean=self.mean,
            std=self.std,
            augmentation=self.augmentation,
        )


def _augment(image: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """Random crop of the original size from the zero-padded image, then a random flip."""
    padding = augmentation.crop_padding
    _, height, width = image.shape  # [C, H, W]
    if padding > 0:
        padded = F.pad(image, (padding, padding, padding, padding))  # [C, H + 2p, W + 2p]
        top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        image = padded[:, top : top + height, left : left + width]
    if augmentation.horizontal_flip and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image.contiguous()


def build_datasets(
    name: str,
    *,
    data_dir: str | None = None,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    augment: bool = False,
    train_subset: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
    tokenizer: str | None = None,
    max_length: int = 128,
    train_file: str | os.PathLike | None = None,
    valid_file: str | os.PathLike | None = None,
    valid_fraction: float = 0.1,
    block_size: int = 128,
    stride: int | None = None,
    packing: bool = False,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build the train and test datasets for a named dataset.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Directory with the dataset's files; default ``$ALAMBIC_DATA/<name>``. Unused for
            ``digits`` and ``custom``.
        factory: For ``custom``: ``"package.module:function"`` returning ``(train, test)`` or
            ``(train, test, num_classes)``.
        factory_kwargs: Keyword arguments for the factory.
        augment: Random crop (padding 4, or 2 for 28x28 images) and, for CIFAR, horizontal flips on
            the training set. The test set is never augmented. No effect on ``digits`` and ``custom``.
        train_subset: Keep a seeded, class-stratified subset of this many training samples.
        test_fraction: For ``digits``: the stratified share of samples held out for testing.
        seed: Seeds the ``digits`` split and the ``train_subset`` choice.
        normalize: Subtract the dataset's per-channel mean and divide by its std (images only);
            otherwise images are in [0, 1].
        tokenizer: For text sets (``sst2``): a ``transformers`` tokenizer folder or hub id. For language-model
            sets (``text``, ``jsonl``): ``"bytes"`` (the default), ``"chars"`` or a local tokenizer folder.
        max_length: For text sets: sentences are cut to this many tokens; for ``jsonl``: rows are.
        train_file: For ``text`` and ``jsonl``: the training file (see :func:`alambic.data.lm.build_lm_datasets`).
        valid_file: For ``text`` and ``jsonl``: the validation file, used as the test set; default: the last
            ``valid_fraction`` of ``train_file``.
        valid_fraction: For ``text`` (by characters) and ``jsonl`` (by rows) without ``valid_file``.
        block_size: For ``text`` and packed ``jsonl``: tokens per window.
        stride: For ``text``: tokens between training windows; default ``block_size``.
        packing: For ``jsonl``: concatenate rows into blocks instead of padding them.

    Returns:
        ``(train_dataset, test_dataset, info)``; datasets yield ``(float32 input, int label)``, those of
        ``text`` and ``jsonl`` dicts of token tensors (``input_ids``, ``labels``, ...).

    Raises:
        ConfigError: An unknown name, a bad factory or a bad argument value.
        DataError: Missing or malformed data files.

    Example:
        >>> train, test, info = build_datasets("digits", seed=0)
        >>> len(train), len(test), info.input_shape
        (1437, 360, (64,))
    """
    _check_request(name, factory, train_subset)
    if name == "custom":
        return _build_custom(factory, factory_kwargs or {}, train_subset=train_subset, seed=seed)
    if name in LM_DATASETS:
        train, test, info = _build_language_model(
            name, train_file, valid_file, valid_fraction, tokenizer, block_size, stride, max_length, packing
        )
    else:
        train, test, info = _build_builtin(
            name, data_dir, augment, normalize, test_fraction, seed, tokenizer, max_length
        )
    if train_subset is not None:
        train = take_train_subset(train, train_subset, seed=seed, name=name)
    return train, test, info


def _check_request(name: str, factory: str | None, train_subset: object) -> None:
    """One-line errors for an unknown name, a bad ``train_subset``, and a factory given to a named set."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
    ):
        raise ConfigError(f"train_subset must be a positive integer or None, got {train_subset!r}")
    if name != "custom" and factory is not None:
        raise ConfigError(f"factory is only used with dataset 'custom', got factory={factory!r} for {name!r}")


def _build_language_model(
    name: str, train_file: str | os.PathLike | None, valid_file: str | os.PathLike | None,
    valid_fraction: float, tokenizer: str | None, block_size: int, stride: int | None, max_length: int,
    packing: bool,
) -> tuple[Dataset, Dataset, DatasetInfo]:  # fmt: skip
    """``text`` / ``jsonl``: :func:`alambic.data.lm.build_lm_datasets` on local files (its tokenizer dropped)."""
    if train_file is None:
        raise ConfigError(f"dataset {name!r} needs train_file (a local {name} file)")
    train, test, info, _tokenizer = build_lm_datasets(
        name,
        train_file=train_file,
        valid_file=valid_file,
        valid_fraction=valid_fraction,
        tokenizer=tokenizer or "bytes",
        block_size=block_size,
        stride=stride,
        max_length=max_length,
        packing=packing,
    )
    return train, test, info


def _build_builtin(
    name: str, data_dir: str | None, augment: bool, normalize: bool, test_fraction: float, seed: int,
    tokenizer: str | None, max_length: int,
) -> tuple[Dataset, Dataset, DatasetInfo]:  # fmt: skip
    """``digits``, the text classification sets and the image sets, read from ``data_dir``."""
    if name == "digits":
        return _build_digits(test_fraction=test_fraction, seed=seed)
    if name in TEXT_DATASETS:
        train, test, class_names, vocab_size = build_text_datasets(
            name, _resolve_data_dir(name, data_dir), tokenizer=tokenizer, max_length=max_length
        )
        shape = (train.columns["input_ids"].shape[1],)
        return train, test, DatasetInfo(name, len(class_names), shape, class_names, None, None, vocab_size)
    return _build_images(name, _resolve_data_dir(name, data_dir), augment=augment, normalize=normalize)


def take_train_subset(
    train: Dataset, size: int, *, seed: int, name: str, factory: str | None = None
) -> Dataset:
    """The seeded subset of ``size`` training samples that ``train_subset`` keeps: class-stratified for
    alambic's classification sets, a seeded random choice for language-model sets and a ``custom``
    ``factory``'s."""
    if name == "custom":
        return _subset_custom(train, size, seed=seed, factory=str(factory))
    if name in LM_DATASETS:
        return train.subset(_random_indices(len(train), size, seed=seed, what=name))
    return train.subset(_subset_indices(train.labels, size, seed=seed, name=name))


def _resolve_data_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        path = Path(data_dir).expanduser()
    elif os.environ.get("ALAMBIC_DATA"):
        path = Path(os.environ["ALAMBIC_DATA"]).expanduser() / name
    else:
        raise DataError(
            f"{name}: no data directory given; pass --data-dir or set ALAMBIC_DATA to the folder holding {name}/"
        )
    if not path.is_dir():
        raise DataError(f"{name}: data directory {path} does not exist; pass --data-dir or set ALAMBIC_DATA")
    return path


def _build_digits(*, test_fraction: float, seed: int) -> tuple[InMemoryDataset, InMemoryDataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # [1797, 64], pixel counts 0..16 -> [0, 1]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    info = DatasetInfo("digits", 10, (64,), [str(digit) for digit in range(10)], None, None)
    train = InMemoryDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    test = InMemoryDataset(torch.from_numpy(test_x), torch.from_numpy(test_y))
    return train, test, info


def _build_images(
    name: str, data_dir: Path, *, augment: bool, normalize: bool
) -> tuple[InMemoryDataset, InMemoryDataset, DatasetInfo]:
    if name == "mnist":
        arrays = readers.read_mnist_like(data_dir, dataset=name, class_names=readers.MNIST_CLASSES)
        mean, std, flip = (0.1307,), (0.3081,), False
    elif name == "fashion-mnist":
        arrays = readers.read_mnist_like(data_dir, dataset=name, class_names=readers.FASHION_MNIST_CLASSES)
        mean, std, flip = (0.2860,), (0.3530,), False
    elif name == "cifar10-jpeg":
        arrays = readers.read_cifar10_jpeg(data_dir)
        # The pretrained CIFAR-10 teachers (akamaster) were trained with ImageNet statistics.
        mean, std, flip = IMAGENET_MEAN, IMAGENET_STD, True
    elif name == "cifar10":
        arrays = readers.read_cifar_pickles(data_dir, num_classes=10)
        mean, std, flip = CIFAR10_MEAN, CIFAR10_STD, True
    else:  # cifar100
        arrays = readers.read_cifar_pickles(data_dir, num_classes=100)
        mean, std, flip = CIFAR100_MEAN, CIFAR100_STD, True
    train_images, train_labels, test_images, test_labels, class_names = arrays
    if not normalize:
        mean = std = None
    height = train_images.shape[2]
    augmentation = (
        Augmentation(crop_padding=2 if height <= 28 else 4, horizontal_flip=flip) if augment else None
    )
    train = InMemoryDataset(
        torch.from_numpy(train_images),
        torch.from_numpy(train_labels),
        mean=mean,
        std=std,
        augmentation=augmentation,
    )
    test = InMemoryDataset(torch.from_numpy(test_images), torch.from_numpy(test_labels), mean=mean, std=std)
    info = DatasetInfo(name, len(class_names), tuple(train_images.shape[1:]), class_names, mean, std)
    return train, test, info


def _subset_indices(labels: torch.Tensor, size: int, *, seed: int, name: str) -> torch.Tensor:
    """Seeded subset of ``size`` indices, stratified by class when every class can get a sample."""
    if size > len(labels):
        raise ConfigError(f"train_subset={size} is larger than the {len(labels)} training samples of {name}")
    if size == len(labels):
        return torch.arange(len(labels))
    from sklearn.model_selection import train_test_split

    all_indices = np.arange(len(labels))
    label_array = labels.numpy()
    class_counts = np.bincount(label_array)
    present = class_counts[class_counts > 0]
    stratify = label_array if size >= len(present) and present.min() >= 2 else None
    chosen, _ = train_test_split(all_indices, train_size=size, stratify=stratify, random_state=seed)
    return torch.from_numpy(np.sort(chosen))


def _build_custom(
    factory: str | None, factory_kwargs: dict, *, train_subset: int | None, seed: int
) -> tuple[Dataset, Dataset, DatasetInfo]:
    if factory is None:
        raise ConfigError('dataset "custom" needs factory="package.module:function"')
    function = import_callable(factory, what="dataset factory")
    try:
        result = function(**factory_kwargs)
    except Exception as error:  # the user's code: name it and its error in one line (--debug: traceback)
        reason = str(error).splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"dataset factory {factory!r} raised {type(error).__name__}: {reason} "
            "(fix the factory or data.factory_kwargs; --debug shows the traceback)"
        ) from error
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise ConfigError(
            f"dataset factory {factory!r} returned {type(result).__name__}; "
            "expected a tuple (train_dataset, test_dataset) or (train_dataset, test_dataset, num_classes)"
        )
    train, test = result[0], result[1]
    for role, dataset in (("train", train), ("test", test)):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or len(dataset) == 0:
            raise ConfigError(
                f"dataset factory {factory!r}: the {role} dataset must be a non-empty map-style Dataset"
            )
    sample, _label = train[0][:2]
    num_classes = result[2] if len(result) == 3 else _infer_num_classes(train, factory)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"dataset factory {factory!r} returned num_classes={num_classes!r}; expected a positive int"
        )
    for role, dataset in (("train", train), ("test", test)):
        _check_label_range(dataset, num_classes, f"dataset factory {factory!r}: the {role} set")
    classes = getattr(train, "classes", None)
    class_names = (
        [str(item) for item in classes]
        if classes is not None and len(classes) == num_classes
        else [str(index) for index in range(num_classes)]
    )
    if train_subset is not None:
        train = take_train_subset(train, train_subset, seed=seed, name="custom", factory=factory)
    info = DatasetInfo("custom", num_classes, tuple(torch.as_tensor(sample).shape), class_names, None, None)
    return train, test, info


def _infer_num_classes(dataset: Dataset, factory: str) -> int:
    for attribute in ("num_classes", "classes"):
        value = getattr(dataset, attribute, None)
        if value is not None:
            return value if isinstance(value, int) else len(value)
    labels = _labels_of(dataset)
    if labels is None or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ConfigError(
            f"dataset factory {factory!r}: cannot infer num_classes from labels; return it as a third value"
        )
    return int(labels.max()) + 1


def _labels_of(dataset: Dataset) -> torch.Tensor | None:
    """Every label: the ``labels`` / ``targets`` attribute when there is one, else one pass over the data.

    None when the samples are not ``(input, label)`` pairs (e.g. dicts of token ids)."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = _labels_of(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        if not isinstance(dataset[0], (tuple, list)):
            return None
        labels = [dataset[index][1] for index in range(len(dataset))]  # one pass over the data
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None


def _check_label_range(dataset: Dataset, num_classes: int, what: str) -> None:
    """Labels outside ``0 .. num_classes - 1`` fail here, before training, not as an index error in a loss."""
    labels = _labels_of(dataset)
    if labels is None or labels.dim() != 1 or labels.dtype.is_floating_point or len(labels) == 0:
        return  # not class labels (e.g. token sequences); the losses check their own inputs
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(
            f"{what} has label {bad}, outside 0..{num_classes - 1} for num_classes={num_classes}; "
            "fix the labels or return the right num_classes as the factory's third value"
        )


def _subset_custom(dataset: Dataset, size: int, *, seed: int, factory: str) -> Dataset:
    indices = _random_indices(len(dataset), size, seed=seed, what=f"factory {factory!r}")
    return torch.utils.data.Subset(dataset, indices.tolist())


def _random_indices(length: int, size: int, *, seed: int, what: str) -> torch.Tensor:
    """``size`` of ``range(length)``, a seeded random choice in increasing order."""
    if size > length:
        raise ConfigError(f"train_subset={size} is larger than the {length} samples of {what}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[:size].sort().values
