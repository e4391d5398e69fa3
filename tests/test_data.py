"""Tests for alambic.data: readers, in-memory datasets, augmentation, subsets, caches, real files."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alambic.data import (
    DATASETS,
    Augmentation,
    InMemoryDataset,
    build_datasets,
    dataset_fingerprint,
    read_idx,
    readers,
)
from alambic.errors import ConfigError, DataError


def shared_data_dir() -> Path:
    """``$ALAMBIC_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    if os.environ.get("ALAMBIC_SHARED_DATA"):
        return Path(os.environ["ALAMBIC_SHARED_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def requires_shared(relative: str):
    path = shared_data_dir() / relative
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"real data {path} is absent (set ALAMBIC_SHARED_DATA to the shared data folder)",
    )


# --------------------------------------------------------------------------------------------------
# helpers writing tiny files in the real formats


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an idx file (magic 0x0000 08 ndim, big-endian int32 sizes, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(directory: Path, num_train: int = 40, num_test: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


def add_tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    archive.addfile(member, io.BytesIO(data))


def write_fake_jpeg_tarball(directory: Path, per_class: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / readers.CIFAR10_JPEG_TARBALL
    with tarfile.open(path, "w:gz") as archive:
        for split in ("train", "test"):
            for class_name in ("cat", "airplane"):  # deliberately not in label order
                for index in range(per_class):
                    buffer = io.BytesIO()
                    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                    add_tar_member(archive, f"{split}/{class_name}/{index:04d}.jpg", buffer.getvalue())
    return path


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    write_fake_mnist(tmp_path / "mnist")
    return tmp_path / "mnist"


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_split_and_stratification():
    train, test, info = build_datasets("digits", test_fraction=0.2, seed=0)
    assert (len(train), len(test)) == (1437, 360)
    assert info.num_classes == 10 and info.input_shape == (64,) and info.mean is None
    sample, label = train[0]
    assert sample.shape == (64,) and sample.dtype == torch.float32 and isinstance(label, int)
    assert float(train.inputs.min()) >= 0.0 and float(train.inputs.max()) <= 1.0
    all_counts = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    assert int(all_counts.sum()) == 1797
    test_counts = torch.bincount(test.labels, minlength=10)
    assert torch.all((test_counts - all_counts * 0.2).abs() <= 1)  # stratified: 20% of each class


def test_digits_split_is_deterministic_per_seed():
    first, _, _ = build_datasets("digits", seed=3)
    again, _, _ = build_datasets("digits", seed=3)
    other, _, _ = build_datasets("digits", seed=4)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.inputs, other.inputs)


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.1])
def test_digits_rejects_bad_test_fraction(test_fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        build_datasets("digits", test_fraction=test_fraction)


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown dataset 'mnsit'.*fashion-mnist"):
        build_datasets("mnsit")
    assert "cifar10-jpeg" in DATASETS


# --------------------------------------------------------------------------------------------------
# idx reader


@pytest.mark.parametrize("compressed", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compressed: bool):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    loaded = read_idx(path)
    assert loaded.shape == (2, 3, 4) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, array)


def test_read_idx_big_endian_int32(tmp_path: Path):
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "ints.idx").write_bytes(
        bytes([0, 0, 0x0C, 1]) + np.array([3], ">u4").tobytes() + values.tobytes()
    )
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.idx"), [1, -2, 70000])


@pytest.mark.parametrize(
    "corruption, message",
    [
        (lambda raw: b"\x01\x02" + raw[2:], "bad magic number"),
        (lambda raw: raw[:-5], "truncated or corrupt"),
        (lambda raw: raw + b"\x00", "truncated or corrupt"),
        (lambda raw: raw[:6], "truncated"),
        (lambda raw: b"", "bad magic number"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, corruption, message):
    raw = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    (tmp_path / "bad.idx").write_bytes(corruption(raw))
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "bad.idx")


def test_read_idx_rejects_truncated_gzip(tmp_path: Path):
    compressed = gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))
    (tmp_path / "bad.idx.gz").write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(tmp_path / "bad.idx.gz")


# --------------------------------------------------------------------------------------------------
# MNIST-like datasets from tiny fake files


def test_fake_mnist_shapes_and_normalisation(fake_mnist: Path):
    train, test, info = build_datasets("mnist", data_dir=str(fake_mnist))
    assert (len(train), len(test)) == (40, 20)
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.mean == (0.1307,) and info.std == (0.3081,)
    image, label = train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 3
    expected = (train.inputs[3].float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(image, expected)
    raw, _ = build_datasets("mnist", data_dir=str(fake_mnist), normalize=False)[0][3]
    torch.testing.assert_close(raw, train.inputs[3].float() / 255)


def test_uncompressed_idx_files_are_accepted(fake_mnist: Path):
    for path in fake_mnist.glob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    train, test, _ = build_datasets("mnist", data_dir=str(fake_mnist))
    assert (len(train), len(test)) == (40, 20)


def test_data_dir_defaults_to_alambic_data(fake_mnist: Path, monkeypatch):
    monkeypatch.setenv("ALAMBIC_DATA", str(fake_mnist.parent))
    train, _, _ = build_datasets("mnist")
    assert len(train) == 40
    monkeypatch.delenv("ALAMBIC_DATA")
    with pytest.raises(DataError, match="ALAMBIC_DATA"):
        build_datasets("mnist")


def test_missing_idx_file_names_file_and_directory(fake_mnist: Path):
    (fake_mnist / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"mnist: no train-images-idx3-ubyte\.gz in .*--data-dir"):
        build_datasets("mnist", data_dir=str(fake_mnist))


def test_image_and_label_counts_must_agree(fake_mnist: Path):
    labels = np.zeros(7, dtype=np.uint8)
    (fake_mnist / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match="20 test images but 7 test labels"):
        build_datasets("mnist", data_dir=str(fake_mnist))


# --------------------------------------------------------------------------------------------------
# augmentation


def all_crops(image: torch.Tensor, padding: int, flip: bool) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every image a crop-with-padding (and optional flip) can produce, keyed by (top, left, flipped)."""
    padded = F.pad(image, (padding,) * 4)
    height, width = image.shape[1:]
    crops = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + height, left : left + width]
            crops[(top, left, False)] = crop
            if flip:
                crops[(top, left, True)] = crop.flip(-1)
    return crops


def matching_crops(
    sample: torch.Tensor, image: torch.Tensor, padding: int, flip: bool
) -> list[tuple[int, int, bool]]:
    return [key for key, crop in all_crops(image, padding, flip).items() if torch.equal(sample, crop)]


def test_augmentation_changes_train_not_test_and_is_repeatable(fake_mnist: Path):
    plain_train, plain_test, _ = build_datasets("mnist", data_dir=str(fake_mnist), normalize=False)
    train, test, _ = build_datasets("mnist", data_dir=str(fake_mnist), augment=True, normalize=False)
    assert train.augmentation == Augmentation(crop_padding=2, horizontal_flip=False)
    for index in range(len(test)):
        assert torch.equal(test[index][0], plain_test[index][0])
    torch.manual_seed(0)
    first = torch.stack([train[index][0] for index in range(len(train))])
    torch.manual_seed(0)
    second = torch.stack([train[index][0] for index in range(len(train))])
    assert torch.equal(first, second)
    plain = torch.stack([plain_train[index][0] for index in range(len(plain_train))])
    assert not torch.equal(first, plain)
    offsets = set()
    for index in range(len(train)):  # every sample is a shifted copy padded with black pixels, never flipped
        matches = matching_crops(first[index], plain[index], 2, flip=True)
        assert matches and not any(flipped for _, _, flipped in matches)
        offsets.add(matches[0][:2])
    assert any(top != left for top, left in offsets)  # vertical and horizontal shifts are drawn independently


def test_cifar_style_augmentation_flips_and_pads_by_four():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    dataset = InMemoryDataset(images, torch.zeros(8), augmentation=Augmentation(4, horizontal_flip=True))
    seen = set()
    for _ in range(6):
        for index in range(len(dataset)):
            matches = matching_crops(dataset[index][0], images[index].float() / 255, 4, flip=True)
            assert len(matches) == 1  # random pixels: exactly one crop fits
            seen.add(matches[0])
    assert {flipped for _, _, flipped in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 20  # many of the 81 offsets occur


# --------------------------------------------------------------------------------------------------
# subsets and fingerprints


def test_train_subset_is_stratified_and_seeded():
    full, _, _ = build_datasets("digits")
    subset, test, _ = build_datasets("digits", train_subset=100, seed=0)
    again, _, _ = build_datasets("digits", train_subset=100, seed=0)
    assert len(subset) == 100 and len(test) == 360
    assert torch.equal(subset.inputs, again.inputs)
    assert torch.bincount(subset.labels, minlength=10).min() >= 9  # about 10 of each class
    with pytest.raises(ConfigError, match="larger than the 1437"):
        build_datasets("digits", train_subset=5000)
    with pytest.raises(ConfigError, match="positive integer"):
        build_datasets("digits", train_subset=0)
    assert dataset_fingerprint(subset) != dataset_fingerprint(full)


def test_fingerprint_is_stable_and_ignores_augmentation(fake_mnist: Path):
    train, test, _ = build_datasets("mnist", data_dir=str(fake_mnist))
    augmented, _, _ = build_datasets("mnist", data_dir=str(fake_mnist), augment=True)
    assert dataset_fingerprint(train) == dataset_fingerprint(augmented)
    assert len(dataset_fingerprint(train)) == 64
    assert dataset_fingerprint(train) != dataset_fingerprint(test)
    raw, _, _ = build_datasets("mnist", data_dir=str(fake_mnist), normalize=False)
    assert dataset_fingerprint(raw) != dataset_fingerprint(train)  # normalisation is part of it
    relabelled = InMemoryDataset(train.inputs, train.labels.flip(0), mean=train.mean, std=train.std)
    assert dataset_fingerprint(relabelled) != dataset_fingerprint(train)  # labels are part of it
    generic = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10))
    assert dataset_fingerprint(generic) == dataset_fingerprint(generic)


# --------------------------------------------------------------------------------------------------
# CIFAR JPEG tarball cache and CIFAR pickles (tiny fake files)


def test_jpeg_tarball_is_decoded_once_then_cached(tmp_path: Path, monkeypatch):
    tarball = write_fake_jpeg_tarball(tmp_path / "cifar10-jpeg")
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    train, test, info = build_datasets("cifar10-jpeg", data_dir=str(tarball.parent))
    assert (len(train), len(test)) == (4, 4) and info.input_shape == (3, 32, 32)
    assert info.class_names == ["airplane", "cat"] and train.labels.tolist() == [0, 0, 1, 1]
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(readers, "_decode_jpeg_tarball", fail)
    cached_train, _, _ = build_datasets("cifar10-jpeg", data_dir=str(tarball.parent))
    assert torch.equal(cached_train.inputs, train.inputs)
    os.utime(tarball, ns=(0, 12345))  # a changed tarball is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        build_datasets("cifar10-jpeg", data_dir=str(tarball.parent))


def test_missing_jpeg_tarball_says_what_is_expected(tmp_path: Path):
    with pytest.raises(DataError, match="no cifar10-jpeg-yoongikim.tar.gz in"):
        build_datasets("cifar10-jpeg", data_dir=str(tmp_path))


def test_cifar10_pickle_tarball(tmp_path: Path):
    rng = np.random.default_rng(0)

    def batch(count: int) -> bytes:
        # Each row is the red plane, then green, then blue, each 32x32 in row-major order.
        planes = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        planes[:, 0, 0, :3] = [10, 11, 12]
        planes[:, 1, 1, 0] = 20
        return pickle.dumps({b"data": planes.reshape(count, 3072), b"labels": list(range(count))})

    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
        for index in range(1, 6):
            add_tar_member(archive, f"cifar-10-batches-py/data_batch_{index}", batch(4))
        add_tar_member(archive, "cifar-10-batches-py/test_batch", batch(3))
        names = [name.encode() for name in readers.CIFAR10_CLASSES]
        add_tar_member(archive, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": names}))
    train, test, info = build_datasets("cifar10", data_dir=str(tmp_path), augment=True)
    assert (len(train), len(test)) == (20, 3) and info.class_names == readers.CIFAR10_CLASSES
    assert train.inputs.shape == (20, 3, 32, 32) and test.labels.tolist() == [0, 1, 2]
    assert train[0][0].shape == (3, 32, 32)
    assert (
        train.inputs[:, 0, 0, :3].tolist() == [[10, 11, 12]] * 20
        and train.inputs[:, 1, 1, 0].tolist() == [20] * 20
    )


def test_cifar100_extracted_folder(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [99 - index for index in range(count)]
        (folder / split).write_bytes(
            pickle.dumps({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * count})
        )
    with pytest.raises(DataError, match="no meta in"):
        build_datasets("cifar100", data_dir=str(tmp_path))
    names = [f"class{index}".encode() for index in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    train, test, info = build_datasets("cifar100", data_dir=str(tmp_path))
    assert (len(train), len(test), info.num_classes) == (6, 2, 100) and train.labels[0] == 99
    assert info.mean == pytest.approx((0.5071, 0.4865, 0.4409))


# --------------------------------------------------------------------------------------------------
# custom factories


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch) -> str:
    source = textwrap.dedent(
        """
        import torch
        from torch.utils.data import TensorDataset

        def two(size=30):
            inputs = torch.randn(size, 5)
            labels = torch.arange(size) % 3
            return TensorDataset(inputs, labels), TensorDataset(inputs[:6], labels[:6])

        def three():
            train, test = two()
            return train, test, 7

        def wrong():
            return [1, 2]
        """
    )
    (tmp_path / "alambic_test_factories.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "alambic_test_factories"


def test_custom_factory(factory_module: str):
    train, test, info = build_datasets("custom", factory=f"{factory_module}:two", factory_kwargs={"size": 12})
    assert (len(train), len(test), info.num_classes, info.input_shape) == (12, 6, 3, (5,))
    _, _, info = build_datasets("custom", factory=f"{factory_module}:three")
    assert info.num_classes == 7
    subset, _, _ = build_datasets("custom", factory=f"{factory_module}:two", train_subset=10)
    assert len(subset) == 10


@pytest.mark.parametrize(
    "factory, message",
    [
        (None, "needs factory"),
        ("alambic_test_factories.two", '"package.module:function"'),
        ("no_such_module_xyz:make", "cannot import"),
        ("alambic_test_factories:missing", "has no function 'missing'"),
        ("alambic_test_factories:wrong", "expected a tuple"),
    ],
)
def test_custom_factory_errors(factory_module: str, factory, message):
    with pytest.raises(ConfigError, match=message):
        build_datasets("custom", factory=factory)


# --------------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
@requires_shared("mnist")
def test_real_mnist():
    train, test, info = build_datasets("mnist", data_dir=str(shared_data_dir() / "mnist"))
    assert (len(train), len(test)) == (60000, 10000) and info.input_shape == (1, 28, 28)
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # images and labels stay paired
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    pixels = train.inputs.float() / 255
    assert abs(float(pixels.mean()) - 0.1307) < 1e-3 and abs(float(pixels.std()) - 0.3081) < 1e-3


@pytest.mark.slow
@requires_shared("fashion-mnist")
def test_real_fashion_mnist():
    train, test, info = build_datasets("fashion-mnist", data_dir=str(shared_data_dir() / "fashion-mnist"))
    assert (len(train), len(test)) == (60000, 10000) and info.class_names[0] == "T-shirt/top"
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


@pytest.mark.slow
@requires_shared("cifar10-jpeg/cifar10-jpeg-yoongikim.tar.gz")
def test_real_cifar10_jpeg():
    train, test, info = build_datasets("cifar10-jpeg", data_dir=str(shared_data_dir() / "cifar10-jpeg"))
    assert (len(train), len(test)) == (50000, 10000)
    assert info.num_classes == 10 and info.class_names == readers.CIFAR10_CLASSES
    assert train.inputs.shape == (50000, 3, 32, 32) and train.inputs.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    channel_means = (train.inputs.float() / 255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(channel_means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=2e-3, rtol=0)


def test_cifar_batches_refuse_pickled_code():
    import os
    import pickle

    from alambic.data.readers import _unpickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DataError, match="refusing to load"):
        _unpickle(pickle.dumps({b"data": Evil()}), "data_batch_1")
    batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
    assert _unpickle(pickle.dumps(batch), "data_batch_1")[b"labels"] == [0, 1]


def test_a_users_dataloader_over_indexed_dataset_fetches_whole_batches_with_their_indices():
    from torch.utils.data import DataLoader, TensorDataset

    from alambic.data import IndexedDataset

    inputs, labels = torch.arange(40.0).reshape(20, 2), torch.arange(20) % 3
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        IndexedDataset(TensorDataset(inputs, labels)), batch_size=6, shuffle=True, generator=generator
    )
    seen = []
    for batch_inputs, batch_labels, index in loader:  # each row is the sample its index names
        assert torch.equal(batch_inputs, inputs[index]) and torch.equal(batch_labels, labels[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(20)) and seen != list(range(20))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"input_ids": torch.full((3,), i), "labels": torch.tensor(i)}

    (batch,) = DataLoader(IndexedDataset(Tokens()), batch_size=5)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and batch["input_ids"][:, 0].tolist() == [0, 1, 2, 3, 4]

    with pytest.raises(DataError, match="pairs or dicts"):
        next(iter(DataLoader(IndexedDataset(torch.arange(4.0)), batch_size=2)))
