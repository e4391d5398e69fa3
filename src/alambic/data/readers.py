"""Readers for the on-disk dataset formats, returning plain numpy arrays.

Each reader takes a directory and returns ``(train_images, train_labels, test_images, test_labels,
class_names)`` with images as ``uint8`` arrays in channels-first layout ``[N, C, H, W]`` and labels
as ``int64`` arrays ``[N]``. They know nothing about tensors, normalisation or augmentation; that
lives in :mod:`alambic.data.datasets`.

Formats:

- idx (MNIST, Fashion-MNIST): http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS" at the bottom).
- CIFAR python pickles: https://www.cs.toronto.edu/~kriz/cifar.html.
- CIFAR-10 JPEG tarball: ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, decoded once with
  Pillow and cached as ``.npz`` in the user cache directory (see :func:`cache_dir`).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np

from alambic.errors import DataError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_JPEG_TARBALL = "cifar10-jpeg-yoongikim.tar.gz"
CIFAR10_PICKLE_TARBALL = "cifar-10-python.tar.gz"
CIFAR100_PICKLE_TARBALL = "cifar-100-python.tar.gz"

# Third byte of an idx magic number -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CACHE_FORMAT_VERSION = 1

ImageArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


# --------------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzip-compressed when the name ends in ``.gz``) into a numpy array.

    Args:
        path: The idx file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        The array with the shape stored in the header and a native-endian dtype.

    Raises:
        DataError: The file is missing, truncated, or its header is not an idx header.

    Example:
        >>> images = read_idx("mnist/train-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape
        (60000, 28, 28)
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"idx file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read idx file {path}: {error} (the file is corrupt or truncated)") from None
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) idx file; see :func:`read_idx`."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{source} is not an idx file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000<type><ndim>, e.g. 00000803 for uint8 images)"
        )
    dtype = _IDX_DTYPES[raw[2]]
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise DataError(
            f"{source} is truncated: {len(raw)} bytes, shorter than its {header_size}-byte header"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4))
    expected_size = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected_size:
        raise DataError(
            f"{source} has {len(raw)} bytes but its header (shape {shape}, {dtype.name}) "
            f"needs {expected_size}; the file is truncated or corrupt, download it again"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find_idx_file(data_dir: Path, base_name: str, dataset: str) -> Path:
    for candidate in (base_name + ".gz", base_name):
        if (data_dir / candidate).is_file():
            return data_dir / candidate
    raise DataError(
        f"{dataset}: no {base_name}.gz in {data_dir} "
        f"(expected the 4 idx files {', '.join(IDX_FILES.values())}, gzipped or not; pass --data-dir)"
    )


def read_mnist_like(data_dir: str | Path, *, dataset: str, class_names: list[str]) -> ImageArrays:
    """Read the 4 idx files of MNIST or Fashion-MNIST from ``data_dir``.

    Returns:
        ``(train_images [60000, 1, 28, 28] uint8, train_labels [60000] int64, test_images, test_labels,
        class_names)``.

    Raises:
        DataError: A file is missing or malformed, or image and label counts disagree.
    """
    data_dir = Path(data_dir)
    paths = {key: _find_idx_file(data_dir, name, dataset) for key, name in IDX_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"{dataset}: {paths[f'{split}_images'].name} has shape {images.shape} and "
                f"{paths[f'{split}_labels'].name} has shape {labels.shape}; expected [N, H, W] and [N]"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{dataset}: {len(images)} {split} images but {len(labels)} {split} labels in {data_dir}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(
                f"{dataset}: {split} labels span {labels.min()}..{labels.max()}, "
                f"expected 0..{len(class_names) - 1}"
            )
    return (
        arrays["train_images"][:, None].astype(np.uint8),  # [N, 1, H, W]
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None].astype(np.uint8),
        arrays["test_labels"].astype(np.int64),
        list(class_names),
    )


# --------------------------------------------------------------------------------------------------
# CIFAR python pickles


def _open_tarball(path: Path, dataset: str, expected: str) -> tarfile.TarFile:
    if not path.is_file():
        raise DataError(f"{dataset}: no {path.name} in {path.parent} (expected {expected}; pass --data-dir)")
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(
            f"{dataset}: cannot open {path}: {error} (corrupt or truncated; download it again)"
        ) from None


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and refuses every other class.

    The CIFAR python batches are pickles (the dataset's own format); a tampered file could name any
    callable, so only what a genuine batch contains may be built.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(raw: bytes, source: str) -> dict:
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # any failure here means a corrupt or tampered member
        raise DataError(f"cannot read CIFAR batch {source}: {error!r}") from None


def read_cifar_pickles(data_dir: str | Path, *, num_classes: int) -> ImageArrays:
    """Read the original CIFAR-10 / CIFAR-100 python tarball (or its extracted folder).

    Args:
        data_dir: Directory holding ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, or the
            extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder.
        num_classes: 10 or 100; CIFAR-100 uses the 100 fine labels.

    Returns:
        ``(train_images [50000, 3, 32, 32] uint8, train_labels, test_images [10000, 3, 32, 32], test_labels,
        class_names)``.
    """
    data_dir = Path(data_dir)
    if num_classes == 10:
        dataset, tarball, folder = "cifar10", CIFAR10_PICKLE_TARBALL, "cifar-10-batches-py"
        train_members = [f"data_batch_{index}" for index in range(1, 6)]
        test_members, meta_member = ["test_batch"], "batches.meta"
        label_key, names_key = b"labels", b"label_names"
    else:
        dataset, tarball, folder = "cifar100", CIFAR100_PICKLE_TARBALL, "cifar-100-python"
        train_members, test_members, meta_member = ["train"], ["test"], "meta"
        label_key, names_key = b"fine_labels", b"fine_label_names"

    archive = None
    if not (data_dir / folder).is_dir():
        archive = _open_tarball(data_dir / tarball, dataset, f"the official python tarball {tarball}")

    def read_member(name: str) -> dict:
        if archive is None:  # the extracted folder
            path = data_dir / folder / name
            if not path.is_file():
                raise DataError(
                    f"{dataset}: no {name} in {data_dir / folder} (expected the extracted {tarball})"
                )
            return _unpickle(path.read_bytes(), str(path))
        try:
            member = archive.extractfile(f"{folder}/{name}")
        except KeyError:
            member = None
        if member is None:
            raise DataError(
                f"{dataset}: {data_dir / tarball} has no member {folder}/{name}; download it again"
            )
        return _unpickle(member.read(), f"{tarball}:{folder}/{name}")

    try:
        splits = []
        for members in (train_members, test_members):
            batches = [read_member(name) for name in members]
            images = np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32)
            labels = np.concatenate([np.asarray(batch[label_key], dtype=np.int64) for batch in batches])
            splits.append((images.astype(np.uint8), labels))
        class_names = [name.decode("utf-8") for name in read_member(meta_member)[names_key]]
    except KeyError as error:
        raise DataError(
            f"{dataset}: a batch in {data_dir} lacks the key {error}; is this the python version?"
        ) from None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(
            f"{dataset}: {data_dir / tarball} is corrupt or truncated ({error}); download it again"
        ) from None
    finally:
        if archive is not None:
            archive.close()
    (train_images, train_labels), (test_images, test_labels) = splits
    return train_images, train_labels, test_images, test_labels, class_names


# --------------------------------------------------------------------------------------------------
# CIFAR-10 JPEG tarball, decoded once and cached


def cache_dir() -> Path:
    """The directory for decoded-dataset caches.

    ``$ALAMBIC_CACHE`` if set, else ``$XDG_CACHE_HOME/alambic``, else ``~/.cache/alambic``. Data
    directories may be read-only, so caches never go next to the data.
    """
    if os.environ.get("ALAMBIC_CACHE"):
        return Path(os.environ["ALAMBIC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "alambic"


def _decode_jpeg_tarball(path: Path, dataset: str) -> ImageArrays:
    from PIL import Image  # Pillow is needed only for this format

    samples: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    with _open_tarball(
        path, dataset, f"{CIFAR10_JPEG_TARBALL} with train/<class>/*.jpg and test/<class>/*.jpg"
    ) as archive:
        try:
            for member in archive:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) != 3 or parts[0] not in samples:
                    continue
                if not parts[2].lower().endswith((".jpg", ".jpeg")):
                    continue
                raw = archive.extractfile(member).read()
                with Image.open(io.BytesIO(raw)) as image:
                    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
                samples[parts[0]].append((parts[1], parts[2], pixels))
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(
                f"{dataset}: {path} is corrupt or truncated ({error}); download it again"
            ) from None
    for split, items in samples.items():
        if not items:
            raise DataError(f"{dataset}: {path} has no {split}/<class>/*.jpg members")
    found = sorted({class_name for class_name, _, _ in samples["train"]})
    test_classes = sorted({class_name for class_name, _, _ in samples["test"]})
    if test_classes != found:
        raise DataError(f"{dataset}: train classes {found} differ from test classes {test_classes} in {path}")
    # CIFAR-10's canonical label order is alphabetical, so pretrained teachers' logits line up.
    class_names = CIFAR10_CLASSES if sorted(CIFAR10_CLASSES) == found else found
    label_of = {name: index for index, name in enumerate(class_names)}
    arrays = []
    for split in ("train", "test"):
        items = sorted(samples[split], key=lambda item: (label_of[item[0]], item[1]))
        shapes = {item[2].shape for item in items}
        if len(shapes) != 1:
            raise DataError(f"{dataset}: {split} images in {path} have different sizes {sorted(shapes)}")
        arrays.append(np.stack([item[2] for item in items]))  # [N, H, W, 3]
        arrays.append(np.array([label_of[item[0]] for item in items], dtype=np.int64))
    return arrays[0], arrays[1], arrays[2], arrays[3], list(class_names)


def _write_cache(cache_path: Path, arrays: ImageArrays) -> None:
    train_images, train_labels, test_images, test_labels, class_names = arrays
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so a crash never leaves a half-written cache.
        with tempfile.NamedTemporaryFile(dir=cache_path.parent, suffix=".tmp.npz", delete=False) as handle:
            np.savez(
                handle,
                train_images=train_images,
                train_labels=train_labels,
                test_images=test_images,
                test_labels=test_labels,
                class_names=np.array(class_names),
            )
        os.chmod(handle.name, 0o644)  # temporary files are created private
        os.replace(handle.name, cache_path)
    except OSError as error:
        warnings.warn(
            f"could not write the decoded-data cache {cache_path} ({error}); "
            "set ALAMBIC_CACHE to a writable directory to avoid decoding again",
            stacklevel=3,
        )


def _read_cache(cache_path: Path) -> ImageArrays | None:
    try:
        with np.load(cache_path, allow_pickle=False) as cached:
            return (
                cached["train_images"],
                cached["train_labels"],
                cached["test_images"],
                cached["test_labels"],
                [str(name) for name in cached["class_names"]],
            )
    except Exception:  # a corrupt or foreign cache file is rebuilt, never fatal
        return None


def read_cifar10_jpeg(data_dir: str | Path) -> ImageArrays:
    """Read the CIFAR-10 JPEG tarball, decoding it once and caching the pixels.

    The decoded arrays are cached in :func:`cache_dir` under a name keyed by the tarball's name, size
    and modification time, so a changed tarball is decoded again. Decoding 60,000 JPEGs takes about
    10 s; loading the cache well under a second.

    Args:
        data_dir: Directory holding ``cifar10-jpeg-yoongikim.tar.gz``.

    Returns:
        ``(train_images [50000, 3, 32, 32] uint8, train_labels, test_images [10000, 3, 32, 32], test_labels,
        class_names)``.
    """
    path = Path(data_dir) / CIFAR10_JPEG_TARBALL
    if not path.is_file():
        raise DataError(
            f"cifar10-jpeg: no {CIFAR10_JPEG_TARBALL} in {Path(data_dir)} "
            "(expected the tarball with train/<class>/*.jpg and test/<class>/*.jpg; pass --data-dir)"
        )
    stat = path.stat()
    cache_name = (
        f"{path.name.removesuffix('.tar.gz')}-{stat.st_size}-{stat.st_mtime_ns}-v{_CACHE_FORMAT_VERSION}.npz"
    )
    cache_path = cache_dir() / cache_name
    arrays = _read_cache(cache_path) if cache_path.is_file() else None
    if arrays is None:
        arrays = _decode_jpeg_tarball(path, "cifar10-jpeg")
        _write_cache(cache_path, arrays)
    train_images, train_labels, test_images, test_labels, class_names = arrays
    # The cache holds [N, H, W, 3] as decoded; tensors are channels-first.
    return (
        np.ascontiguousarray(train_images.transpose(0, 3, 1, 2)),
        train_labels,
        np.ascontiguousarray(test_images.transpose(0, 3, 1, 2)),
        test_labels,
        class_names,
    )
